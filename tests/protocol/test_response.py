"""Responses and error envelopes: built by the worker, opened (or raised) by the producer."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from provider.protocol import (
    DecryptFailedError,
    EncryptionRequiredError,
    EnvelopeCodec,
    ErrorEnvelope,
    FleetError,
    InvalidSignatureError,
    MalformedError,
    VerifiedRequest,
)
from provider.vllm.errors import ServerBusyError

from . import LANE, NOW, PARAMS, SECRET_PROMPT, TASK, build, producer

BODY: dict[str, Any] = {
    "content": "Hello!",
    "tool_calls": [{"id": "t1", "type": "function", "function": {"name": "f", "arguments": "{}"}}],
    "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7},
    "finish_reason": "stop",
    "metadata": {"instance": "gpu1"},
    "reasoning": "thinking...",
}


def verified(codec: EnvelopeCodec, **overrides: Any) -> VerifiedRequest:
    return codec.verify_request(build(codec, **overrides), lane=LANE, task_name=TASK, now=NOW + 1)


@pytest.mark.parametrize("encrypt", [True, False])
def test_response_round_trip(encrypt: bool) -> None:
    codec = producer(encrypt=encrypt)
    request = verified(codec)
    envelope = codec.response(request, BODY)
    assert envelope["message_type"] == "llm.fleet.response"
    assert ("sealed_body" in envelope) is encrypt
    assert ("content" in envelope) is not encrypt
    assert envelope["usage"] == BODY["usage"]
    assert envelope["finish_reason"] == "stop"
    opened = codec.open_response(envelope, request_id=request.request_id, lane=LANE)
    assert opened["content"] == "Hello!"
    assert opened["tool_calls"] == BODY["tool_calls"]
    assert opened["metadata"] == {"instance": "gpu1"}
    assert "reasoning" not in opened
    assert opened["request_id"] == request.request_id
    assert opened["routing_key"] == LANE
    assert "sealed_body" not in opened


def test_reasoning_only_when_asked() -> None:
    codec = producer()
    asked = verified(codec, params={**PARAMS, "include_reasoning": True})
    opened = codec.open_response(codec.response(asked, BODY), request_id=asked.request_id)
    assert opened["reasoning"] == "thinking..."
    plain = verified(codec)
    forced = codec.response(plain, BODY, include_reasoning=True)
    assert codec.open_response(forced, request_id=plain.request_id)["reasoning"] == "thinking..."


def test_result_for_non_chat_operations() -> None:
    codec = producer()
    request = verified(codec, operation="list_models", params={}, model=None)
    envelope = codec.response(request, {"result": {"models": ["a", "b"]}})
    assert codec.open_response(envelope, request_id=request.request_id)["result"] == {"models": ["a", "b"]}


def test_response_refuses_unknown_body_fields() -> None:
    codec = producer()
    with pytest.raises(MalformedError):
        codec.response(verified(codec), {"content": "x", "prompt": "y"})
    with pytest.raises(MalformedError):
        codec.response(verified(codec), {"content": 5})


def test_open_response_checks() -> None:
    codec = producer()
    request = verified(codec)
    envelope = codec.response(request, BODY)
    rid = request.request_id
    refused = [
        (envelope, "someone-else", None, None),
        (envelope, rid, "other.lane", None),
        (envelope, rid, None, "embed"),
        ({**envelope, "request_id": "r-2"}, "r-2", None, None),
        ({"message_type": "llm.fleet.request"}, rid, None, None),
        ("garbage", rid, None, None),
        ({**envelope, "schema_version": 1}, rid, None, None),
        ({k: v for k, v in envelope.items() if k != "worker_signature"}, rid, None, None),
    ]
    for candidate, request_id, lane, operation in refused:
        with pytest.raises(FleetError) as caught:
            codec.open_response(candidate, request_id=request_id, lane=lane, operation=operation)
        assert caught.value.code == "response_forged"
    assert codec.open_response(envelope, request_id=rid, lane=LANE, operation="chat")["content"] == BODY["content"]


def test_plain_response_refused_when_encryption_on() -> None:
    plain_codec, sealed_codec = producer(encrypt=False), producer(encrypt=True)
    request = verified(plain_codec)
    with pytest.raises(FleetError) as caught:
        sealed_codec.open_response(plain_codec.response(request, BODY), request_id=request.request_id)
    assert caught.value.code == EncryptionRequiredError.code


def test_sealed_result_cannot_pass_as_sealed_params() -> None:
    codec = producer()
    envelope = build(codec, request_id="r-9")
    request = codec.verify_request(envelope, lane=LANE, task_name=TASK, now=NOW + 1)
    response = codec.response(request, {"content": "x"})
    forged = copy.deepcopy(envelope)
    forged["sealed_params"] = response["sealed_body"]
    with pytest.raises(DecryptFailedError):
        codec.verify_request(forged, lane=LANE, task_name=TASK, now=NOW + 1)


def test_error_envelope_from_envelope_error() -> None:
    codec = producer()
    request = verified(codec)
    envelope = codec.error(request, InvalidSignatureError(field="signed_token"))
    ErrorEnvelope.model_validate(envelope)
    assert envelope["code"] == "invalid_signature"
    assert envelope["category"] == "policy_error"
    assert envelope["error_class"] == "InvalidSignatureError"
    assert envelope["retryable"] is False
    assert envelope["metadata"] == {"field": "signed_token"}
    assert envelope["request_id"] == request.request_id
    with pytest.raises(FleetError) as info:
        codec.open_response(envelope, request_id=request.request_id)
    assert info.value.code == "invalid_signature"
    assert info.value.error_class == "InvalidSignatureError"
    assert info.value.umbrella == "policy_error"


def test_error_envelope_from_provider_error() -> None:
    codec = producer()
    request = verified(codec)
    envelope = codec.error(request, ServerBusyError("The engine is currently busy", status_code=503, instance="gpu1"))
    assert envelope["code"] == "server_busy"
    assert envelope["category"] == "provider_error"
    assert envelope["retryable"] is True
    assert envelope["message"] == "The engine is currently busy"
    assert envelope["metadata"] == {"instance": "gpu1", "status_code": 503}
    with pytest.raises(FleetError) as info:
        codec.open_response(envelope, request_id=request.request_id)
    assert info.value.retryable is True


def test_error_message_never_quotes_params() -> None:
    codec = producer()
    request = verified(codec)
    quoting = ServerBusyError(f"bad input: ...{SECRET_PROMPT[3:28]}...", status_code=400)
    envelope = codec.error(request, quoting)
    assert SECRET_PROMPT[3:28] not in envelope["message"]
    assert "withheld" in envelope["message"]
    untyped = codec.error(request, KeyError(SECRET_PROMPT))
    assert untyped["code"] == "provider_error"
    assert SECRET_PROMPT not in str(untyped)
    assert untyped["message"] == "the worker failed (KeyError)"


def test_error_envelope_without_or_with_unverified_source() -> None:
    codec = producer()
    bare = codec.error(None, MalformedError())
    assert "request_id" not in bare
    assert bare["code"] == "malformed"
    raw = {
        "request_id": "r-1",
        "correlation_id": "c\x00bad",
        "operation": "rm",
        "params": {"x": SECRET_PROMPT},
    }
    from_raw = codec.error(raw, MalformedError())
    assert from_raw["request_id"] == "r-1"
    assert "correlation_id" not in from_raw
    assert "operation" not in from_raw
    assert SECRET_PROMPT not in str(from_raw)
    for answer in (from_raw, bare):
        with pytest.raises(FleetError) as caught:
            codec.open_response(answer, request_id="r-2")
        assert caught.value.code == "response_forged"


def test_error_message_is_capped() -> None:
    codec = producer()
    envelope = codec.error(None, MalformedError("x" * 5000))
    assert len(envelope["message"]) == 1024


def test_error_message_explaining_a_parameter_is_kept() -> None:
    """vLLM's explanation of a bad parameter names fields and values, not the caller's content: it is kept."""
    from provider.vllm.errors import BadRequestError

    codec = producer()
    request = verified(codec, params={**PARAMS, "temperature": -1, "response_format": {"type": "json_schema"}})
    for message in (
        "temperature must be non-negative, got -1.0. (parameter=temperature, value=-1.0)",
        "Requested sample logprobs of 50, which is greater than max allowed: 20 (parameter=logprobs, value=50)",
        "1 validation error:\n  {'type': 'value_error', 'loc': 'body.response_format', 'input': {'type': "
        "'json_schema'}}",
        "max_tokens=999999 cannot be greater than max_model_len=2048. Please request fewer output tokens.",
    ):
        envelope = codec.error(request, BadRequestError(message, status_code=400))
        assert envelope["message"] == message
