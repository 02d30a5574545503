"""The error tree: one class per code, umbrella codes, messages that carry no secrets."""

from __future__ import annotations

import pytest

from provider.protocol import errors
from provider.protocol.errors import (
    ERROR_CLASSES,
    EnvelopeError,
    FleetError,
    error_class_for,
    umbrella_code,
)

BRIEF_CODES = {
    "invalid_signature",
    "expired",
    "not_yet_valid",
    "replayed",
    "wrong_issuer",
    "wrong_audience",
    "claim_mismatch",
    "payload_hash_mismatch",
    "unsupported_version",
    "legacy_field",
    "too_large",
    "operation_not_allowed",
    "decrypt_failed",
    "idempotency_conflict",
    "malformed",
    "unknown_key",
    "unsupported_contract",
}


def test_every_code_has_a_class() -> None:
    assert set(ERROR_CLASSES) >= BRIEF_CODES
    for code, cls in ERROR_CLASSES.items():
        assert issubclass(cls, EnvelopeError)
        assert cls.code == code
        assert cls.retryable is False
        assert error_class_for(code) is cls
    assert error_class_for("nope") is None


def test_tree_is_drawn_in_the_docstring() -> None:
    doc = errors.__doc__ or ""
    for cls in [*ERROR_CLASSES.values(), FleetError]:
        assert cls.__name__ in doc
        assert cls.code in doc or cls is FleetError


@pytest.mark.parametrize(
    ("code", "umbrella"),
    [
        ("unknown_key", "configuration_error"),
        ("key_configuration", "configuration_error"),
        ("unsupported_version", "configuration_error"),
        ("unsupported_contract", "configuration_error"),
        ("invalid_signature", "policy_error"),
        ("replayed", "policy_error"),
        ("idempotency_conflict", "policy_error"),
        ("malformed", "policy_error"),
        ("expired", "policy_error"),
        ("policy_error", "policy_error"),
        ("configuration_error", "configuration_error"),
        ("server_busy", "provider_error"),
        ("fleet_timeout", "provider_error"),
        ("anything", "provider_error"),
    ],
)
def test_umbrella_codes(code: str, umbrella: str) -> None:
    assert umbrella_code(code) == umbrella


def test_every_code_maps_to_an_umbrella() -> None:
    for code, cls in ERROR_CLASSES.items():
        assert umbrella_code(code) in {"configuration_error", "policy_error"}
        assert cls().umbrella == umbrella_code(code)


def test_default_messages_and_fields() -> None:
    error = errors.ClaimMismatchError(field="lane")
    assert str(error) == "a signed claim does not match the envelope"
    assert error.field == "lane"
    assert "claim_mismatch" in repr(error)
    assert str(errors.MalformedError("custom")) == "custom"


def test_fleet_error_keeps_the_remote_code() -> None:
    error = FleetError(
        "busy",
        code="server_busy",
        retryable=True,
        error_class="ServerBusyError",
        request_id="r",
        metadata={"a": 1},
    )
    assert error.code == "server_busy"
    assert error.retryable is True
    assert error.umbrella == "provider_error"
    assert error.metadata == {"a": 1}
    assert not isinstance(error, EnvelopeError)  # its own root: callers catch FleetError, never EnvelopeError
    assert "server_busy" in repr(error)
