"""The envelope models on their own: strict, closed, and the legacy-field check."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from provider.protocol import (
    ALLOWED_OPERATIONS,
    INFERENCE_OPERATIONS,
    MANAGEMENT_OPERATIONS,
    ErrorEnvelope,
    LegacyFieldError,
    MalformedError,
    RequestEnvelope,
    ResponseEnvelope,
    check_legacy_fields,
)
from provider.protocol.envelope import format_expires_at, parse_expires_at

from . import build, producer


def request() -> dict[str, Any]:
    return build(producer())


def test_request_model_accepts_a_built_envelope() -> None:
    model = RequestEnvelope.model_validate(request())
    assert model.protocol_version == 2
    assert model.sealed_params is not None
    assert model.params is None


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("protocol_version", 1),
        ("protocol_version", "2"),
        ("timeout_seconds", "30"),
        ("operation", "image"),
        ("message_type", "llm.fleet.response"),
        ("extra_field", 1),
        ("params", {"messages": []}),
        ("model", 5),
        ("routing_key", ""),
    ],
)
def test_request_model_refuses(field: str, value: object) -> None:
    with pytest.raises(ValidationError):
        RequestEnvelope.model_validate({**request(), field: value})


def test_request_model_needs_params_or_sealed() -> None:
    envelope = request()
    del envelope["sealed_params"]
    with pytest.raises(ValidationError):
        RequestEnvelope.model_validate(envelope)


def test_int_timeout_is_a_number() -> None:
    assert RequestEnvelope.model_validate({**request(), "timeout_seconds": 30}).timeout_seconds == 30.0


def test_response_model() -> None:
    base = {
        "message_type": "llm.fleet.response",
        "request_id": "r",
        "correlation_id": "c",
        "reply_to": "celery:r",
    }
    assert ResponseEnvelope.model_validate({**base, "content": "hi"}).content == "hi"
    box = {"alg": "A256GCM", "kid": "e1", "nonce": "AAAAAAAAAAAAAAAA", "ciphertext": "AAAA"}
    ResponseEnvelope.model_validate({**base, "sealed_body": box, "usage": {"total_tokens": 3}})
    with pytest.raises(ValidationError):
        ResponseEnvelope.model_validate({**base, "sealed_body": box, "content": "hi"})
    with pytest.raises(ValidationError):
        ResponseEnvelope.model_validate({**base, "thinking": "x"})


def test_error_model() -> None:
    error = ErrorEnvelope.model_validate(
        {
            "message_type": "llm.fleet.error",
            "code": "expired",
            "category": "policy_error",
            "message": "late",
            "error_class": "ExpiredError",
            "retryable": False,
        }
    )
    assert error.request_id is None
    with pytest.raises(ValidationError):
        ErrorEnvelope.model_validate({**error.model_dump(), "category": "other"})


def test_operations() -> None:
    assert {"chat", "stream_chat", "embed"} == INFERENCE_OPERATIONS
    assert {"health", "sleep", "wake_up", "discover", "reset_prefix_cache"} <= set(MANAGEMENT_OPERATIONS)
    assert INFERENCE_OPERATIONS | set(MANAGEMENT_OPERATIONS) == ALLOWED_OPERATIONS
    assert len(set(MANAGEMENT_OPERATIONS)) == len(MANAGEMENT_OPERATIONS)
    assert len(ALLOWED_OPERATIONS) == 13


def test_expires_at_forms() -> None:
    assert format_expires_at(1_800_000_000.1234) == "2027-01-15T08:00:00.123Z"
    assert parse_expires_at("2027-01-15T08:00:00.123Z") == pytest.approx(1_800_000_000.123)
    assert parse_expires_at("2027-01-15T08:00:00+00:00") == 1_800_000_000.0
    for bad in (
        "2027-01-15",
        "2027-01-15T08:00:00",
        "2027-01-15T08:00:00+01:00",
        "2027-13-15T08:00:00Z",
        "x",
    ):
        with pytest.raises(ValueError):
            parse_expires_at(bad)


def test_legacy_paths() -> None:
    check_legacy_fields({"a": [{"b": 1}], "c": {"d": "schema_version"}})
    with pytest.raises(LegacyFieldError) as info:
        check_legacy_fields({"a": [{"b": 1}, {"c": {"schema_version": 1}}]})
    assert info.value.field == "a[1].c.schema_version"
    with pytest.raises(LegacyFieldError) as info:
        check_legacy_fields([{"request_type": 1}], where="params")
    assert info.value.field == "params[0].request_type"


def test_nesting_limit() -> None:
    value: Any = {}
    for _ in range(100):
        value = {"x": value}
    with pytest.raises(MalformedError):
        check_legacy_fields(value)
