"""Answers are authenticated by the worker that wrote them: producers verify, and cannot forge one themselves."""

from __future__ import annotations

import functools
import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import SecretStr

from provider.protocol import EnvelopeCodec, FleetError, MalformedError, VerifiedRequest

from . import LANE, NOW, TASK, build, keypair, producer, producer_settings, worker

BODY: dict[str, Any] = {
    "content": "Hello!",
    "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7},
    "finish_reason": "stop",
    "metadata": {"instance": "gpu1"},
}


def request_for(codec: EnvelopeCodec, encrypt: bool = True) -> VerifiedRequest:
    """A request the worker codec verified."""
    return worker(encrypt=encrypt).verify_request(
        build(producer(encrypt=encrypt)), lane=LANE, task_name=TASK, now=NOW + 1
    )


def producer_only(encrypt: bool = True) -> EnvelopeCodec:
    """A producer as deployed: request signing key, the workers' public response keys, no response signing key."""
    return EnvelopeCodec(producer_settings(encrypt=encrypt, response_signing_key=None))


def refused(codec: EnvelopeCodec, answer: Any, request: VerifiedRequest) -> str:
    """The code ``open_response`` refuses ``answer`` with (it must refuse it)."""
    with pytest.raises(FleetError) as caught:
        codec.open_response(answer, request_id=request.request_id, lane=request.lane, operation=request.operation)
    return caught.value.code


@pytest.mark.parametrize("encrypt", [True, False])
def test_a_producer_opens_what_a_worker_signed(encrypt: bool) -> None:
    request = request_for(worker(encrypt=encrypt), encrypt)
    answer = worker(encrypt=encrypt).response(request, BODY)
    opened = producer_only(encrypt).open_response(answer, request_id=request.request_id, lane=LANE, operation="chat")
    assert opened["content"] == "Hello!"


@pytest.mark.parametrize("encrypt", [True, False])
def test_a_producer_cannot_sign_answers(encrypt: bool) -> None:
    """Holding the request key (and the sealing key) is not enough to write an answer."""
    request = request_for(worker(encrypt=encrypt), encrypt)
    with pytest.raises(Exception, match="response signing key"):
        producer_only(encrypt).response(request, BODY)


@pytest.mark.parametrize("encrypt", [True, False])
def test_answers_signed_by_an_unknown_worker_key_are_refused(encrypt: bool) -> None:
    """Another Ed25519 key under the right kid, and a kid nobody configured."""
    request = request_for(worker(encrypt=encrypt), encrypt)
    for kid, variant in (("w1", 1), ("w9", 0)):
        impostor = EnvelopeCodec(
            producer_settings(
                encrypt=encrypt,
                response_signing_key=SecretStr(keypair("EdDSA", kid, variant).private),
                response_signing_kid=kid,
                response_verify_keys={},
            )
        )
        assert refused(producer_only(encrypt), impostor.response(request, BODY), request) == "response_forged"
        error = impostor.error(request, MalformedError())
        assert refused(producer_only(encrypt), error, request) == "response_forged"


def test_forged_plain_content_is_refused_with_encryption_off() -> None:
    request = request_for(worker(encrypt=False), False)
    answer = worker(encrypt=False).response(request, BODY)
    assert refused(producer_only(False), {**answer, "content": "forged"}, request) == "response_forged"


def test_an_answer_for_another_operation_is_refused() -> None:
    request = request_for(worker())
    answer = worker().response(request, BODY)
    with pytest.raises(FleetError) as caught:
        producer_only().open_response(answer, request_id=request.request_id, lane=LANE, operation="embed")
    assert caught.value.code == "response_forged"


@functools.cache
def stored_answers() -> dict[str, tuple[VerifiedRequest, bytes]]:
    """A sealed response, a plain one and an error envelope (with the requests they answer), as JSON the way the
    result backend keeps them."""
    sealed = request_for(worker(), True)
    plain = request_for(worker(encrypt=False), False)
    return {
        "sealed": (sealed, json.dumps(worker().response(sealed, BODY), separators=(",", ":")).encode()),
        "plain": (plain, json.dumps(worker(encrypt=False).response(plain, BODY), separators=(",", ":")).encode()),
        "error": (sealed, json.dumps(worker().error(sealed, MalformedError()), separators=(",", ":")).encode()),
    }


@pytest.mark.parametrize("kind", ["sealed", "plain", "error"])
def test_the_stored_answers_open_unchanged(kind: str) -> None:
    request, stored = stored_answers()[kind]
    codec = producer_only(kind != "plain")
    if kind == "error":
        with pytest.raises(FleetError) as caught:
            codec.open_response(stored, request_id=request.request_id, lane=LANE, operation="chat")
        assert caught.value.code == "malformed"
    else:
        assert codec.open_response(stored, request_id=request.request_id, lane=LANE, operation="chat")["content"]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kind=st.sampled_from(["sealed", "plain", "error"]), data=st.data())
def test_any_single_byte_change_to_a_stored_answer_is_refused(kind: str, data: st.DataObject) -> None:
    request, stored = stored_answers()[kind]
    position = data.draw(st.integers(min_value=0, max_value=len(stored) - 1))
    value = data.draw(st.integers(min_value=0, max_value=255).filter(lambda byte: byte != stored[position]))
    changed = stored[:position] + bytes([value]) + stored[position + 1 :]
    with pytest.raises(FleetError) as caught:
        producer_only(kind != "plain").open_response(
            changed, request_id=request.request_id, lane=LANE, operation="chat"
        )
    assert caught.value.code == "response_forged"


def test_worker_keys_rotate_by_kid() -> None:
    """Producers trusting w1 and w2 open answers of either; once w1 is removed, w1's answers are refused."""
    request = request_for(worker())
    old = worker().response(request, BODY)  # signed with w1
    new_worker = EnvelopeCodec(
        producer_settings(
            response_signing_key=SecretStr(keypair("EdDSA", "w2").private),
            response_signing_kid="w2",
            response_verify_keys={},
        )
    )
    new = new_worker.response(request, BODY)
    both = {kid: SecretStr(keypair("EdDSA", kid).public) for kid in ("w1", "w2")}
    during = EnvelopeCodec(producer_settings(response_signing_key=None, response_verify_keys=both))
    after = EnvelopeCodec(producer_settings(response_signing_key=None, response_verify_keys={"w2": both["w2"]}))
    for answer in (old, new):
        assert during.open_response(answer, request_id=request.request_id)["content"] == "Hello!"
    assert after.open_response(new, request_id=request.request_id)["content"] == "Hello!"
    assert refused(after, old, request) == "response_forged"
