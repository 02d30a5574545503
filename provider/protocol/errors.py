"""The fleet protocol's errors: one root, one class per refusal code, each mapped to a seeds' umbrella code.

    EnvelopeError                   root: ``code``, ``retryable``, ``field``; never carries keys or payload
    ├── MalformedError              malformed              not JSON, not an object, refused by the schema
    ├── LegacyFieldError            legacy_field           a v1 field (schema_version, ...) at any depth
    ├── UnsupportedVersionError     unsupported_version    protocol_version is not 2
    ├── UnsupportedContractError    unsupported_contract   an execution contract this side does not know
    ├── OperationNotAllowedError    operation_not_allowed  an operation outside the allow-list
    ├── TooLargeError               too_large              over ``max_envelope_bytes``
    ├── EncryptionRequiredError     encryption_required    a plain payload while encryption is required
    ├── InvalidSignatureError       invalid_signature      not a JWS, another algorithm, bad signature
    ├── UnknownKeyError             unknown_key            a ``kid`` this side has no key for
    ├── WrongIssuerError            wrong_issuer           ``iss`` not in the accepted list
    ├── WrongAudienceError          wrong_audience         ``aud`` is not this fleet's workers
    ├── NotYetValidError            not_yet_valid          ``nbf``/``iat`` in the future (beyond leeway)
    ├── ExpiredError                expired                past ``expires_at``/``exp`` (beyond leeway)
    ├── TokenLifetimeError          token_lifetime         lives past its timeout or the fleet's maximum
    ├── ClaimMismatchError          claim_mismatch         a signed claim differs from envelope, lane, task
    ├── PayloadHashMismatchError    payload_hash_mismatch  the params are not the ones signed
    ├── DecryptFailedError          decrypt_failed         AES-GCM refused (wrong key, tampered, truncated)
    ├── ReplayedError               replayed               a different message reusing a seen ``jti``
    ├── IdempotencyConflictError    idempotency_conflict   same idempotency key, different params
    ├── KeyConfigurationError       key_configuration      keys missing, malformed or of the wrong kind
    └── FleetError                  (the remote code)      what an error envelope reports, on the producer;
                                    response_forged        or: no fleet worker signed this answer for the request

Every code has one umbrella code of the seeds (``umbrella_code``): ``configuration_error`` when the two
sides are configured differently (keys, versions, contracts), ``policy_error`` when a message is refused,
and ``provider_error`` for anything else (the worker's provider failed, or a code not listed here).
No envelope error is retryable: an invalid message is never executed and never requeued.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = [
    "CONFIGURATION_ERROR",
    "ERROR_CLASSES",
    "POLICY_ERROR",
    "PROVIDER_ERROR",
    "RESPONSE_FORGED",
    "ClaimMismatchError",
    "DecryptFailedError",
    "EncryptionRequiredError",
    "EnvelopeError",
    "ExpiredError",
    "FleetError",
    "IdempotencyConflictError",
    "InvalidSignatureError",
    "KeyConfigurationError",
    "LegacyFieldError",
    "MalformedError",
    "NotYetValidError",
    "OperationNotAllowedError",
    "PayloadHashMismatchError",
    "ReplayedError",
    "TokenLifetimeError",
    "TooLargeError",
    "UnknownKeyError",
    "UnsupportedContractError",
    "UnsupportedVersionError",
    "WrongAudienceError",
    "WrongIssuerError",
    "as_fleet_error",
    "error_class_for",
    "response_forged",
    "umbrella_code",
]

CONFIGURATION_ERROR = "configuration_error"
POLICY_ERROR = "policy_error"
PROVIDER_ERROR = "provider_error"


class EnvelopeError(Exception):
    """Root of every error the fleet protocol raises; the message names fields, never their values."""

    code: str = "envelope_error"
    retryable: bool = False
    default_message: str = "the envelope was refused"

    def __init__(self, message: str | None = None, *, field: str | None = None) -> None:
        self.message = message or self.default_message
        self.field = field
        super().__init__(self.message)

    def __str__(self) -> str:
        return self.message

    def __repr__(self) -> str:
        return f"{type(self).__name__}(code={self.code!r}, message={self.message!r})"

    @property
    def umbrella(self) -> str:
        """The seeds' umbrella code for this error."""
        return umbrella_code(self.code)


class MalformedError(EnvelopeError):
    """Not JSON, not an object, or refused by the envelope schema."""

    code = "malformed"
    default_message = "the envelope is malformed"


class LegacyFieldError(EnvelopeError):
    """A protocol v1 field (``schema_version``, ``request_type``, ``fleet_correlation_id``) is present."""

    code = "legacy_field"
    default_message = "the envelope carries a legacy (v1) field"


class UnsupportedVersionError(EnvelopeError):
    """``protocol_version`` is not the one this side speaks."""

    code = "unsupported_version"
    default_message = "unsupported protocol version"


class UnsupportedContractError(EnvelopeError):
    """An execution contract this side does not implement."""

    code = "unsupported_contract"
    default_message = "unsupported execution contract"


class OperationNotAllowedError(EnvelopeError):
    """An operation outside the protocol's (or the task's) allow-list."""

    code = "operation_not_allowed"
    default_message = "operation not allowed"


class TooLargeError(EnvelopeError):
    """The envelope is larger than ``max_envelope_bytes``."""

    code = "too_large"
    default_message = "the envelope is too large"


class EncryptionRequiredError(EnvelopeError):
    """A plain payload arrived while this side requires sealed payloads."""

    code = "encryption_required"
    default_message = "the payload must be sealed"


class InvalidSignatureError(EnvelopeError):
    """The token is not a compact JWS, uses another algorithm, or its signature does not verify."""

    code = "invalid_signature"
    default_message = "the token signature is invalid"


class UnknownKeyError(EnvelopeError):
    """A key id (token ``kid`` or sealed ``kid``) this side holds no key for."""

    code = "unknown_key"
    default_message = "unknown key id"


class WrongIssuerError(EnvelopeError):
    """The token's issuer is not in the accepted list."""

    code = "wrong_issuer"
    default_message = "the token issuer is not accepted"


class WrongAudienceError(EnvelopeError):
    """The token is meant for someone else."""

    code = "wrong_audience"
    default_message = "the token audience does not match"


class NotYetValidError(EnvelopeError):
    """``nbf`` or ``iat`` lies in the future beyond the leeway."""

    code = "not_yet_valid"
    default_message = "the token is not yet valid"


class ExpiredError(EnvelopeError):
    """The deadline (``expires_at`` = token ``exp``) has passed beyond the leeway."""

    code = "expired"
    default_message = "the request deadline has passed"


class TokenLifetimeError(EnvelopeError):
    """A token that lives longer than its own timeout (plus leeway) or than the fleet's maximum lifetime."""

    code = "token_lifetime"
    default_message = "the token lives longer than allowed"


class ClaimMismatchError(EnvelopeError):
    """A signed claim differs from the envelope, the lane it arrived on, or the task that runs it."""

    code = "claim_mismatch"
    default_message = "a signed claim does not match the envelope"


class PayloadHashMismatchError(EnvelopeError):
    """The params are not the ones the token signed."""

    code = "payload_hash_mismatch"
    default_message = "the params do not match the signed hash"


class DecryptFailedError(EnvelopeError):
    """AES-GCM refused to open a sealed part (wrong key, tampered, truncated, other purpose)."""

    code = "decrypt_failed"
    default_message = "the sealed part could not be opened"


class ReplayedError(EnvelopeError):
    """A different message reuses a ``jti`` already seen."""

    code = "replayed"
    default_message = "the request id was already used by another message"


class IdempotencyConflictError(EnvelopeError):
    """The idempotency key was already used with different params."""

    code = "idempotency_conflict"
    default_message = "the idempotency key was already used with different params"


class KeyConfigurationError(EnvelopeError):
    """Keys are missing, malformed, or of the wrong kind for the configured algorithm."""

    code = "key_configuration"
    default_message = "the protocol keys are misconfigured"


class FleetError(EnvelopeError):
    """The error an error envelope reports, raised on the producer side with the remote code kept."""

    code = "fleet_error"

    def __init__(
        self,
        message: str,
        *,
        code: str,
        retryable: bool = False,
        error_class: str | None = None,
        request_id: str | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.retryable = retryable
        self.error_class = error_class
        self.request_id = request_id
        self.metadata: dict[str, Any] = dict(metadata or {})

    def __repr__(self) -> str:
        return (
            f"FleetError(code={self.code!r}, message={self.message!r}, retryable={self.retryable!r}, "
            f"error_class={self.error_class!r})"
        )


RESPONSE_FORGED = "response_forged"


def response_forged(message: str = "the answer was not written by a fleet worker for this request") -> FleetError:
    """The typed error a caller gets instead of anything no fleet worker signed for its request."""
    return FleetError(message, code=RESPONSE_FORGED, retryable=False)


def as_fleet_error(exc: EnvelopeError) -> FleetError:
    """The same refusal as a ``FleetError`` (what callers catch), its code kept."""
    if isinstance(exc, FleetError):
        return exc
    metadata = {"field": exc.field} if exc.field else None
    return FleetError(exc.message, code=exc.code, retryable=exc.retryable, metadata=metadata)


ERROR_CLASSES: dict[str, type[EnvelopeError]] = {
    cls.code: cls
    for cls in (
        MalformedError,
        LegacyFieldError,
        UnsupportedVersionError,
        UnsupportedContractError,
        OperationNotAllowedError,
        TooLargeError,
        EncryptionRequiredError,
        InvalidSignatureError,
        UnknownKeyError,
        WrongIssuerError,
        WrongAudienceError,
        NotYetValidError,
        ExpiredError,
        TokenLifetimeError,
        ClaimMismatchError,
        PayloadHashMismatchError,
        DecryptFailedError,
        ReplayedError,
        IdempotencyConflictError,
        KeyConfigurationError,
    )
}

_CONFIGURATION_CODES = frozenset(
    {"unknown_key", "key_configuration", "unsupported_version", "unsupported_contract", CONFIGURATION_ERROR}
)
_POLICY_CODES = frozenset(ERROR_CLASSES) - _CONFIGURATION_CODES | {POLICY_ERROR}


def umbrella_code(code: str) -> str:
    """The seeds' umbrella code (configuration_error, policy_error, provider_error) for a fine code."""
    if code in _CONFIGURATION_CODES:
        return CONFIGURATION_ERROR
    if code in _POLICY_CODES:
        return POLICY_ERROR
    return PROVIDER_ERROR


def error_class_for(code: str) -> type[EnvelopeError] | None:
    """The local class for a protocol code, or None when the code is not one of this module's."""
    return ERROR_CLASSES.get(code)
