"""Build → verify round trips, and every refusal the codec makes, with its code."""

from __future__ import annotations

import base64
import copy
import hashlib
import hmac
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from provider.protocol import (
    ClaimMismatchError,
    DecryptFailedError,
    EncryptionRequiredError,
    EnvelopeCodec,
    EnvelopeError,
    ExpiredError,
    InvalidSignatureError,
    KeyConfigurationError,
    LegacyFieldError,
    MalformedError,
    NotYetValidError,
    OperationNotAllowedError,
    PayloadHashMismatchError,
    TooLargeError,
    UnknownKeyError,
    UnsupportedContractError,
    UnsupportedVersionError,
    WrongAudienceError,
    WrongIssuerError,
    sha256_hex,
)

from . import (
    CALLER,
    CONTEXT,
    LANE,
    MODEL,
    NOW,
    OTHER_LANE,
    PARAMS,
    SECRET_PROMPT,
    TASK,
    TIMEOUT_S,
    TRACE,
    aes_key,
    b64url,
    build,
    claims_of,
    keypair,
    producer,
    producer_settings,
    raw_token,
    resign,
    worker,
    worker_settings,
)

ALGORITHMS = ["EdDSA", "HS256", "RS256", "ES256"]


def refused(call: Callable[[], object], error: type[EnvelopeError]) -> EnvelopeError:
    """Run call; it must raise exactly that error class, whose message quotes no payload."""
    with pytest.raises(EnvelopeError) as info:
        call()
    assert type(info.value) is error, f"{type(info.value).__name__}: {info.value}"
    assert info.value.code == error.code
    assert SECRET_PROMPT not in str(info.value)
    assert SECRET_PROMPT not in repr(info.value)
    assert info.value.__cause__ is None or not isinstance(info.value.__cause__, ValueError)
    return info.value


def verify(codec: EnvelopeCodec, envelope: object, **kwargs: Any) -> Any:
    """verify_request at NOW + 1 s on LANE for TASK, unless told otherwise."""
    values: dict[str, Any] = {"lane": LANE, "task_name": TASK, "now": NOW + 1}
    values.update(kwargs)
    return codec.verify_request(envelope, **values)


@pytest.mark.parametrize("encrypt", [True, False], ids=["sealed", "plain"])
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_round_trip(algorithm: str, encrypt: bool) -> None:
    envelope = build(producer(algorithm, encrypt=encrypt))
    assert ("sealed_params" in envelope) is encrypt
    assert ("params" in envelope) is not encrypt
    assert SECRET_PROMPT not in envelope["signed_token"]
    assert SECRET_PROMPT not in json.dumps(claims_of(envelope))
    wire = json.dumps(envelope)
    codec = worker(algorithm, encrypt=encrypt)
    for raw in (envelope, wire, wire.encode()):
        verified = verify(codec, raw)
        assert verified.params == PARAMS
        assert verified.operation == "chat"
        assert verified.model == MODEL
        assert verified.lane == LANE
        assert verified.task_name == TASK
        assert verified.provider == "vllm"
        assert verified.provider_instance == "any"
        assert verified.request_id == envelope["request_id"] == verified.correlation_id == verified.idempotency_key
        assert verified.reply_to == f"celery:{verified.request_id}"
        assert verified.message_context == CONTEXT
        assert verified.caller == CALLER
        assert verified.trace_context == TRACE
        assert verified.timeout_seconds == TIMEOUT_S
        assert verified.expires_at_epoch == pytest.approx(NOW + TIMEOUT_S)
        assert verified.sealed is encrypt
        assert verified.params_hash == sha256_hex(PARAMS)
        assert verified.caller_hash == sha256_hex(CALLER)
        assert verified.idempotency_scope == f"{sha256_hex(CALLER)}:chat"
        assert verified.claims["jti"] == verified.request_id
        assert len(verified.token_digest) == 64
        assert SECRET_PROMPT not in repr(verified)


def test_claims_bind_everything() -> None:
    envelope = build(producer(), request_id="r-1", correlation_id="c-1", idempotency_key="i-1")
    claims = claims_of(envelope)
    assert claims["iss"] == "vllm-celery-fleet"
    assert claims["aud"] == "vllm-fleet-worker"
    assert claims["iat"] == claims["nbf"] == int(NOW)
    assert claims["exp"] == int(NOW + TIMEOUT_S)
    assert claims["jti"] == "r-1"
    assert claims["lane"] == LANE
    assert claims["task"] == TASK
    for name in ("request_id", "correlation_id", "idempotency_key", "operation", "provider"):
        assert claims[name] == envelope[name]
    for name in ("provider_instance", "model", "reply_to", "timeout_seconds", "expires_at"):
        assert claims[name] == envelope[name]
    assert claims["params_hash"] == sha256_hex(PARAMS)
    assert claims["message_context_hash"] == sha256_hex(CONTEXT)
    assert claims["caller_hash"] == sha256_hex(CALLER)
    assert claims["trace_context_hash"] == sha256_hex(TRACE)
    assert envelope["expires_at"] == "2027-01-15T08:00:30.000Z"
    assert envelope["message_type"] == "llm.fleet.request"
    assert envelope["protocol_version"] == 2


def test_nil_values_dropped_and_defaults() -> None:
    envelope = build(producer(), model=None, message_context=None, caller=None, trace_context=None)
    assert "model" not in envelope
    assert "execution_contract" not in envelope
    assert envelope["message_context"] == {} == envelope["caller"] == envelope["trace_context"]
    assert "model" not in claims_of(envelope)
    verified = verify(worker(), envelope)
    assert verified.model is None


def test_management_operation_round_trip() -> None:
    envelope = build(
        producer(),
        operation="sleep",
        task_name="fleet.manage",
        params={"level": 1},
        model=None,
        lane="gpu1.manage",
    )
    verified = verify(worker(), envelope, lane="gpu1.manage", task_name="fleet.manage")
    assert verified.operation == "sleep"


def test_worker_cannot_sign() -> None:
    refused(lambda: build(worker()), KeyConfigurationError)


# ------------------------------------------------------------------------------------------------ refusals


def test_wrong_verify_key() -> None:
    envelope = build(producer())
    refused(lambda: verify(worker(kids={"k1": 1}), envelope), InvalidSignatureError)


def test_wrong_hs256_secret() -> None:
    envelope = build(producer("HS256"))
    refused(lambda: verify(worker("HS256", kids={"k1": 1}), envelope), InvalidSignatureError)


def test_tampered_plain_params() -> None:
    envelope = build(producer(encrypt=False))
    envelope["params"]["max_tokens"] = 4096
    refused(lambda: verify(worker(encrypt=False), envelope), PayloadHashMismatchError)


def test_tampered_ciphertext() -> None:
    envelope = build(producer())
    raw = bytearray(base64.b64decode(envelope["sealed_params"]["ciphertext"]))
    raw[5] ^= 0x01
    envelope["sealed_params"]["ciphertext"] = base64.b64encode(bytes(raw)).decode()
    refused(lambda: verify(worker(), envelope), DecryptFailedError)


def test_truncated_ciphertext() -> None:
    envelope = build(producer())
    raw = base64.b64decode(envelope["sealed_params"]["ciphertext"])
    for cut in (raw[:-1], raw[:10], b""):
        changed = copy.deepcopy(envelope)
        changed["sealed_params"]["ciphertext"] = base64.b64encode(cut).decode()
        refused(lambda changed=changed: verify(worker(), changed), DecryptFailedError)


def test_wrong_encryption_key() -> None:
    envelope = build(producer())
    refused(lambda: verify(worker(enc_variant=1), envelope), DecryptFailedError)


def test_unknown_encryption_kid() -> None:
    envelope = build(producer())
    refused(lambda: verify(worker(enc_kid="e2"), envelope), UnknownKeyError)


def test_sealed_params_swapped_between_requests() -> None:
    codec = producer()
    first, second = build(codec), build(codec)
    second["sealed_params"] = first["sealed_params"]
    refused(lambda: verify(worker(), second), DecryptFailedError)


def test_tampered_token_payload() -> None:
    envelope = build(producer())
    head, body, sig = envelope["signed_token"].split(".")
    claims = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    claims["lane"] = OTHER_LANE
    envelope["signed_token"] = f"{head}.{b64url(json.dumps(claims).encode())}.{sig}"
    refused(lambda: verify(worker(), envelope), InvalidSignatureError)


def test_tampered_token_signature() -> None:
    envelope = build(producer())
    head, body, sig = envelope["signed_token"].split(".")
    flipped = "A" if sig[0] != "A" else "B"
    envelope["signed_token"] = f"{head}.{body}.{flipped}{sig[1:]}"
    refused(lambda: verify(worker(), envelope), InvalidSignatureError)


def test_token_from_another_request() -> None:
    codec = producer()
    first, second = build(codec), build(codec)
    second["signed_token"] = first["signed_token"]
    refused(lambda: verify(worker(), second), ClaimMismatchError)


def test_lane_argument_differs() -> None:
    envelope = build(producer())
    error = refused(lambda: verify(worker(), envelope, lane=OTHER_LANE), ClaimMismatchError)
    assert error.field == "lane"


def test_routing_key_swapped() -> None:
    envelope = build(producer())
    envelope["routing_key"] = OTHER_LANE
    for lane in (OTHER_LANE, LANE, None):
        error = refused(lambda lane=lane: verify(worker(), envelope, lane=lane), ClaimMismatchError)
        assert error.field == "lane"


def test_lane_claim_swapped_but_signed() -> None:
    envelope = resign(build(producer()), claims={"lane": OTHER_LANE})
    refused(lambda: verify(worker(), envelope), ClaimMismatchError)
    refused(lambda: verify(worker(), envelope, lane=OTHER_LANE), ClaimMismatchError)


def test_task_swapped() -> None:
    envelope = build(producer())
    error = refused(lambda: verify(worker(), envelope, task_name="fleet.embed"), ClaimMismatchError)
    assert error.field == "task"


def test_deadline_is_checked_after_verification() -> None:
    codec = worker()
    envelope = build(producer())
    late = NOW + TIMEOUT_S + codec.security.leeway_s + 1
    verified = verify(codec, envelope, now=late)
    codec.check_deadline(verified, now=NOW + TIMEOUT_S + codec.security.leeway_s - 1)
    refused(lambda: codec.check_deadline(verified, now=late), ExpiredError)
    refused(lambda: verify(codec, envelope, now=late, enforce_deadline=True), ExpiredError)
    assert verified.time_left_s(now=NOW) == pytest.approx(TIMEOUT_S)


def test_not_yet_valid() -> None:
    codec = worker()
    envelope = build(producer())
    verify(codec, envelope, now=NOW - codec.security.leeway_s + 1)
    error = refused(lambda: verify(codec, envelope, now=NOW - codec.security.leeway_s - 2), NotYetValidError)
    assert error.field == "nbf"
    future_iat = resign(envelope, claims={"iat": int(NOW) + 3600})
    refused(lambda: verify(codec, future_iat), NotYetValidError)


def test_wrong_issuer() -> None:
    envelope = build(producer(issuer="someone-else"))
    refused(lambda: verify(worker(), envelope), WrongIssuerError)
    accepting = worker(accepted_issuers=["vllm-celery-fleet", "someone-else"])
    assert verify(accepting, envelope).request_id == envelope["request_id"]
    refused(lambda: verify(worker(accepted_issuers=["other"]), build(producer())), WrongIssuerError)


def test_wrong_audience() -> None:
    envelope = build(producer(audience="another-fleet"))
    refused(lambda: verify(worker(), envelope), WrongAudienceError)
    listed = resign(build(producer()), claims={"aud": ["x", "vllm-fleet-worker"]})
    verify(worker(), listed)
    refused(lambda: verify(worker(), resign(build(producer()), claims={"aud": 7})), WrongAudienceError)


def test_alg_none() -> None:
    envelope = build(producer())
    claims = claims_of(envelope)
    for signature in (b"", b"\x00" * 64):
        envelope["signed_token"] = raw_token({"alg": "none", "kid": "k1", "typ": "JWT"}, claims, signature)
        refused(lambda: verify(worker(), envelope), InvalidSignatureError)
    envelope["signed_token"] = raw_token({"alg": "none", "kid": "k1"}, claims, b"")[:-1] + "."
    refused(lambda: verify(worker(), envelope), InvalidSignatureError)


def test_hs256_signed_with_public_pem_as_secret() -> None:
    envelope = build(producer())
    claims = claims_of(envelope)
    public_pem = keypair("EdDSA").public.encode()
    header = {"alg": "HS256", "kid": "k1", "typ": "JWT"}
    head = b64url(json.dumps(header).encode())
    body = b64url(json.dumps(claims).encode())
    mac = hmac.new(public_pem, f"{head}.{body}".encode(), hashlib.sha256).digest()
    envelope["signed_token"] = f"{head}.{body}.{b64url(mac)}"
    error = refused(lambda: verify(worker(), envelope), InvalidSignatureError)
    assert error.field == "alg"


def test_unknown_kid() -> None:
    envelope = build(producer(kid="k9"))
    error = refused(lambda: verify(worker(), envelope), UnknownKeyError)
    assert error.field == "kid"
    no_kid = build(producer())
    _head, body, sig = no_kid["signed_token"].split(".")
    no_kid["signed_token"] = f"{b64url(json.dumps({'alg': 'EdDSA'}).encode())}.{body}.{sig}"
    refused(lambda: verify(worker(), no_kid), UnknownKeyError)


REQUIRED_FIELDS = [
    "message_type",
    "request_id",
    "correlation_id",
    "idempotency_key",
    "operation",
    "provider",
    "provider_instance",
    "sealed_params",
    "reply_to",
    "message_context",
    "caller",
    "trace_context",
    "signed_token",
    "timeout_seconds",
    "expires_at",
    "routing_key",
]


@pytest.mark.parametrize("name", REQUIRED_FIELDS)
def test_missing_field(name: str) -> None:
    envelope = build(producer())
    del envelope[name]
    error = refused(lambda: verify(worker(), envelope), MalformedError)
    assert error.field == name or name == "sealed_params"


def test_missing_protocol_version() -> None:
    envelope = build(producer())
    del envelope["protocol_version"]
    refused(lambda: verify(worker(), envelope), MalformedError)


def test_missing_model_but_signed() -> None:
    envelope = build(producer())
    del envelope["model"]
    error = refused(lambda: verify(worker(), envelope), ClaimMismatchError)
    assert error.field == "model"


@pytest.mark.parametrize("name", ["iss", "aud", "exp", "nbf", "iat", "jti", "lane", "task", "params_hash"])
def test_missing_claim(name: str) -> None:
    envelope = resign(build(producer()), drop_claims=(name,))
    with pytest.raises(EnvelopeError) as info:
        verify(worker(), envelope)
    assert info.value.code in {
        "wrong_issuer",
        "wrong_audience",
        "malformed",
        "claim_mismatch",
        "payload_hash_mismatch",
    }


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("correlation_id", "c-other"),
        ("idempotency_key", "i-other"),
        ("provider", "ollama"),
        ("provider_instance", "gpu9"),
        ("model", "other-model"),
        ("reply_to", "celery:elsewhere"),
        ("timeout_seconds", 3600.0),
        ("expires_at", "2027-01-15T09:00:30.000Z"),
        ("message_context", {"conversation_id": "c-43", "turn": 3}),
        ("caller", {"app": "evil"}),
        ("trace_context", {}),
    ],
)
def test_envelope_field_differs_from_claim(field: str, value: object) -> None:
    envelope = build(producer())
    envelope[field] = value
    error = refused(lambda: verify(worker(), envelope), ClaimMismatchError)
    assert error.field == field


def test_request_id_differs_from_claim() -> None:
    envelope = build(producer())
    envelope["request_id"] = "r-other"
    error = refused(lambda: verify(worker(), envelope), ClaimMismatchError)
    assert error.field == "jti"


def test_claim_types_are_strict() -> None:
    envelope = build(producer())
    refused(lambda: verify(worker(), resign(envelope, claims={"timeout_seconds": True})), ClaimMismatchError)
    refused(lambda: verify(worker(), resign(envelope, claims={"timeout_seconds": "30"})), ClaimMismatchError)
    refused(lambda: verify(worker(), resign(envelope, claims={"protocol_version": 1})), ClaimMismatchError)
    refused(lambda: verify(worker(), resign(envelope, claims={"exp": int(NOW) + 999})), ClaimMismatchError)
    refused(lambda: verify(worker(), resign(envelope, claims={"exp": "soon"})), MalformedError)
    for name in ("exp", "iat", "nbf"):
        huge = resign(envelope, claims={name: 10**400})
        refused(lambda huge=huge: verify(worker(), huge), MalformedError)
    refused(lambda: verify(worker(), resign(envelope, claims={"timeout_seconds": 10**400})), ClaimMismatchError)


@pytest.mark.parametrize(
    ("where", "path"),
    [
        ("top", ("schema_version",)),
        ("top", ("request_type",)),
        ("top", ("fleet_correlation_id",)),
        ("context", ("message_context", "schema_version")),
        ("nested", ("trace_context", "deep", "request_type")),
    ],
)
def test_legacy_fields(where: str, path: tuple[str, ...]) -> None:
    envelope = build(producer())
    target = envelope
    for key in path[:-1]:
        target = target.setdefault(key, {})
    target[path[-1]] = 1
    error = refused(lambda: verify(worker(), envelope), LegacyFieldError)
    assert error.field == ".".join(path)


def test_legacy_field_in_plain_params() -> None:
    params = {"messages": [{"role": "user", "content": "hi", "meta": {"fleet_correlation_id": "x"}}]}
    envelope = build(producer(encrypt=False), params=params)
    error = refused(lambda: verify(worker(encrypt=False), envelope), LegacyFieldError)
    assert error.field == "params.messages[0].meta.fleet_correlation_id"


def test_legacy_field_in_sealed_params() -> None:
    envelope = build(producer(), params={"request_type": "chat"})
    error = refused(lambda: verify(worker(), envelope), LegacyFieldError)
    assert error.field == "params.request_type"


@pytest.mark.parametrize("version", [1, 3, "2", 2.5, None, True])
def test_wrong_protocol_version(version: object) -> None:
    envelope = build(producer())
    envelope["protocol_version"] = version
    refused(lambda: verify(worker(), envelope), UnsupportedVersionError)


def test_oversized() -> None:
    big = {"messages": [{"role": "user", "content": "x" * 5000}]}
    envelope = build(producer(max_envelope_bytes=4000), params=big)
    codec = worker(max_envelope_bytes=4000)
    wire = json.dumps(envelope)
    for raw in (envelope, wire, wire.encode()):
        refused(lambda raw=raw: verify(codec, raw), TooLargeError)
    small = build(producer())
    assert len(json.dumps(small)) < 4000
    verify(codec, small)


def test_oversized_by_escapes_and_unicode() -> None:
    codec = worker(max_envelope_bytes=4000)
    envelope = build(producer())
    envelope["message_context"] = {"note": "\u00e9" * 1200}
    refused(lambda: verify(codec, envelope), TooLargeError)
    envelope["message_context"] = {"note": "\x01" * 600}
    refused(lambda: verify(codec, envelope), TooLargeError)


@pytest.mark.parametrize(
    "raw",
    [
        None,
        42,
        1.5,
        [],
        [1, 2],
        "not json",
        "[1]",
        '"x"',
        b"\xff\xfe",
        '{"a": 1, "a": 2}',
        '{"a": NaN}',
        b"{",
        set(),
    ],
)
def test_garbage(raw: object) -> None:
    refused(lambda: verify(worker(), raw), MalformedError)


def test_garbage_in_fields() -> None:
    envelope = build(producer())
    for field, value in [
        ("timeout_seconds", "30"),
        ("timeout_seconds", float("nan")),
        ("timeout_seconds", -1.0),
        ("request_id", "has space"),
        ("request_id", 5),
        ("expires_at", "tomorrow"),
        ("expires_at", "2027-13-15T08:00:30.000Z"),
        ("expires_at", "2027-01-15T08:00:30+02:00"),
        ("sealed_params", "xyz"),
        ("message_context", []),
        ("message_context", {"n": 10**400}),
        ("caller", {"n": 2**60}),
        ("trace_context", {"n": float("inf")}),
        ("signed_token", ""),
    ]:
        changed = copy.deepcopy(envelope)
        changed[field] = value
        refused(lambda changed=changed: verify(worker(), changed), MalformedError)


def test_token_garbage() -> None:
    envelope = build(producer())
    for token in ["abc", "a.b", "a.b.c.d", "a.b.c", "!!.??.**", "eyJ9.eyJ9.AA", "e30.e30.AA"]:
        envelope["signed_token"] = token
        with pytest.raises(EnvelopeError) as info:
            verify(worker(), envelope)
        assert info.value.code in {"invalid_signature", "unknown_key"}


def test_padded_token_refused() -> None:
    envelope = build(producer("HS256"))
    head, body, sig = envelope["signed_token"].split(".")
    assert len(sig) % 4
    envelope["signed_token"] = f"{head}.{body}.{sig}{'=' * (-len(sig) % 4)}"
    refused(lambda: verify(worker("HS256"), envelope), InvalidSignatureError)


def test_execution_contracts_are_refused() -> None:
    """No product path pins work to an offering: an exact-offering request is refused, typed, never run loosely."""
    base = build(producer(), provider_instance="gpu1")
    for contract in ("exact_offering_v1", "exact_offering_v9"):
        signed = resign(
            base,
            claims={"execution_contract": contract, "offering_id": "vllm:gpu1:inference:m"},
            fields={"execution_contract": contract, "offering_id": "vllm:gpu1:inference:m"},
        )
        refused(lambda signed=signed: verify(worker(), signed), UnsupportedContractError)
    offering_only = resign(base, claims={"offering_id": "o"}, fields={"offering_id": "o"})
    refused(lambda: verify(worker(), offering_only), MalformedError)
    unsigned = {**base, "execution_contract": "exact_offering_v1", "offering_id": "o"}
    refused(lambda: verify(worker(), unsigned), ClaimMismatchError)


def test_operation_not_allowed() -> None:
    envelope = build(producer())
    envelope["operation"] = "rm_rf"
    refused(lambda: verify(worker(), envelope), OperationNotAllowedError)
    refused(lambda: build(producer(), operation="image"), OperationNotAllowedError)
    refused(lambda: build(producer(), operation="count_tokens"), OperationNotAllowedError)  # no task serves it
    embed = build(producer(), operation="embed", params={"input": ["a"]})
    refused(lambda: verify(worker(), embed, operations={"chat", "stream_chat"}), OperationNotAllowedError)


def test_encryption_required() -> None:
    envelope = build(producer(encrypt=False))
    refused(lambda: verify(worker(encrypt=True), envelope), EncryptionRequiredError)


def test_sealed_accepted_when_encryption_off() -> None:
    envelope = build(producer(encrypt=True))
    assert verify(worker(encrypt=False), envelope).params == PARAMS


def test_build_refuses_bad_input() -> None:
    codec = producer()
    refused(lambda: build(codec, timeout_s=0), MalformedError)
    refused(lambda: build(codec, timeout_s=float("inf")), MalformedError)
    refused(lambda: build(codec, params={"x": float("nan")}), MalformedError)
    refused(lambda: build(codec, params={"x": object()}), MalformedError)
    refused(lambda: build(codec, request_id="bad id"), MalformedError)
    refused(lambda: build(codec, lane="bad lane!"), MalformedError)


# ------------------------------------------------------------------------------------------------ keys


def test_key_rotation() -> None:
    old, new = build(producer(kid="k1")), build(producer(kid="k2"))
    both = worker(kids={"k1": 0, "k2": 0})
    assert verify(both, old).request_id == old["request_id"]
    assert verify(both, new).request_id == new["request_id"]
    only_new = worker(kids={"k2": 0})
    verify(only_new, new)
    refused(lambda: verify(only_new, old), UnknownKeyError)


def test_verify_keys_from_directory(tmp_path: Path) -> None:
    for kid in ("k1", "k2"):
        (tmp_path / f"{kid}.pub.pem").write_text(keypair("EdDSA", kid).public)
    (tmp_path / "README").write_text("ignored")
    codec = EnvelopeCodec(worker_settings(kids={}, verify_keys_dir=tmp_path))
    assert codec.keyring.verify_kids == ("k1", "k2")
    verify(codec, build(producer(kid="k2")))


def test_hs256_secrets_from_directory(tmp_path: Path) -> None:
    (tmp_path / "k1.secret").write_text(keypair("HS256").private + "\n")
    codec = EnvelopeCodec(worker_settings("HS256", kids={}, verify_keys_dir=tmp_path))
    verify(codec, build(producer("HS256")))


def test_signing_key_file(tmp_path: Path) -> None:
    path = tmp_path / "k1.pem"
    path.write_text(keypair("EdDSA").private)
    settings = producer_settings(signing_key=None, signing_key_file=path)
    verify(worker(), build(EnvelopeCodec(settings)))


def test_keyring_algorithm_must_match_settings() -> None:
    codec = producer()
    with pytest.raises(KeyConfigurationError):
        EnvelopeCodec(worker_settings("HS256", kids={}), keyring=codec.keyring)


def test_algorithm_mismatch_between_sides() -> None:
    envelope = build(producer("HS256"))
    refused(lambda: verify(worker("EdDSA"), envelope), InvalidSignatureError)
    envelope = build(producer("ES256"))
    refused(lambda: verify(worker("RS256"), envelope), InvalidSignatureError)


def test_codec_repr_hides_keys() -> None:
    codec = producer("HS256")
    text = repr(codec) + str(codec.keyring)
    assert keypair("HS256").private not in text
    assert aes_key() not in text
    assert "k1" in text


def test_settings_secret_values_are_hidden() -> None:
    settings = producer_settings()
    assert keypair("EdDSA").private not in repr(settings)
    assert isinstance(settings.signing_key, SecretStr)
