"""Two roots: ``EnvelopeError``, the protocol's refusal of a message, and ``FleetError``, what a caller catches.

    EnvelopeError                   root: ``code``, ``field``; never carries keys or payload; never retryable
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
    └── KeyConfigurationError       key_configuration      keys missing, malformed or of the wrong kind

    FleetError                      root: ``code``, ``retryable``, ``message``, ``request_id``, ``metadata``
    │                               (code, retryable: submitting again may succeed)
    ├── InvalidRequest              invalid_request            no   the request's own arguments are wrong
    ├── NoFleetQueue                no_fleet_queue             no   no live lane serves the model, instance or ask
    ├── FleetUnavailable            fleet_unavailable          yes  every instance of the model has an open circuit
    ├── Backpressure                fleet_backpressure         yes  the lane is full
    ├── PublishFailed               fleet_publish_failed       yes  broker or Redis unreachable at submit
    ├── FleetTimeout                fleet_timeout              yes  no answer (or no stream end) by the deadline
    ├── ResultUnavailable           fleet_result_unavailable   yes  the result store is unreachable; get() again
    ├── DeadLettered                fleet_dead_lettered        no   no worker could serve it within the delivery limit
    ├── Cancelled                   cancelled                  no   the stream was cancelled by its producer
    ├── ResponseForged              response_forged            no   no fleet worker signed this answer for the request
    ├── StreamGap                   stream_gap                 no   the stream lost entries
    ├── RequestRefused              (an EnvelopeError code)    no   the protocol refused the request or the answer
    │   └── KeyConfiguration        key_configuration          no   this side's keys are missing or wrong
    └── ProviderFailed              provider_error             no   the worker failed unexpectedly
        ├── ProviderBadRequest      bad_request                no   vLLM refused the request (400/422), its message kept
        ├── ProviderUnauthorized    unauthorized               no   the instance's api key is wrong (401/403)
        ├── ProviderNotFound        not_found                  no   unknown model or route (404)
        ├── ProviderBusy            server_busy                yes  the engine is busy (503)
        ├── ProviderServerError     server_error               yes  another 5xx
        ├── ProviderHttpError       http_error                 no   another HTTP error status
        ├── ProviderTimeout         timeout                    yes  an HTTP timeout at the instance
        ├── ProviderUnreachable     connection_error           yes  the instance could not be reached
        ├── ProviderStreamInterrupted stream_interrupted       yes  the instance dropped a stream mid-way
        ├── ProviderStreamError     stream_error               yes  an error frame without a status inside a stream
        ├── ProviderGenerationAborted generation_aborted       yes  vLLM ended the generation itself
        ├── ProviderInvalidResponse invalid_response           no   an answer that is not vLLM's wire format
        ├── ProviderUnsupported     unsupported_capability     no   the model or server cannot do what was asked
        └── ProviderMisconfigured   configuration_error        no   the worker's instance settings cannot work

Every code is a constant of ``provider.protocol.codes``. ``FleetError(message, code=...)`` builds the class of
that code, with that class's ``retryable`` (a code this side does not know, e.g. from a newer worker, stays a
plain ``FleetError`` and keeps the ``retryable`` it was given). ``as_fleet_error`` maps an ``EnvelopeError`` at
the boundary; a worker's ``ProviderError`` reaches the caller through its error envelope, code kept.
Internal errors never reach a caller as such: ``provider.fleet``'s ``LaneError`` becomes ``no_fleet_queue`` at
submit, ``RegistryEventError`` only drops an event, and ``tasks.errors.FleetTaskError`` only carries an error
envelope through Celery's result backend (the producer turns it back into a ``FleetError``).

Every code has one umbrella code of the seeds (``umbrella_code``): ``configuration_error`` when the two
sides are configured differently (keys, versions, contracts), ``policy_error`` when a message is refused,
and ``provider_error`` for anything else (the worker's provider failed, or a code not listed here).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Self, cast

from provider.protocol import codes
from provider.protocol.codes import CONFIGURATION_ERROR, POLICY_ERROR, PROVIDER_ERROR, RESPONSE_FORGED

__all__ = [
    "CONFIGURATION_ERROR",
    "ERROR_CLASSES",
    "FLEET_ERROR_CLASSES",
    "POLICY_ERROR",
    "PROVIDER_ERROR",
    "RESPONSE_FORGED",
    "Backpressure",
    "Cancelled",
    "ClaimMismatchError",
    "DeadLettered",
    "DecryptFailedError",
    "EncryptionRequiredError",
    "EnvelopeError",
    "ExpiredError",
    "FleetError",
    "FleetTimeout",
    "FleetUnavailable",
    "IdempotencyConflictError",
    "InvalidRequest",
    "InvalidSignatureError",
    "KeyConfiguration",
    "KeyConfigurationError",
    "LegacyFieldError",
    "MalformedError",
    "NoFleetQueue",
    "NotYetValidError",
    "OperationNotAllowedError",
    "PayloadHashMismatchError",
    "ProviderBadRequest",
    "ProviderBusy",
    "ProviderFailed",
    "ProviderGenerationAborted",
    "ProviderHttpError",
    "ProviderInvalidResponse",
    "ProviderMisconfigured",
    "ProviderNotFound",
    "ProviderServerError",
    "ProviderStreamError",
    "ProviderStreamInterrupted",
    "ProviderTimeout",
    "ProviderUnauthorized",
    "ProviderUnreachable",
    "ProviderUnsupported",
    "PublishFailed",
    "ReplayedError",
    "RequestRefused",
    "ResponseForged",
    "ResultUnavailable",
    "StreamGap",
    "TokenLifetimeError",
    "TooLargeError",
    "UnknownKeyError",
    "UnsupportedContractError",
    "UnsupportedVersionError",
    "WrongAudienceError",
    "WrongIssuerError",
    "as_fleet_error",
    "error_class_for",
    "fleet_error_class",
    "response_forged",
    "umbrella_code",
]


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

    code = codes.MALFORMED
    default_message = "the envelope is malformed"


class LegacyFieldError(EnvelopeError):
    """A protocol v1 field (``schema_version``, ``request_type``, ``fleet_correlation_id``) is present."""

    code = codes.LEGACY_FIELD
    default_message = "the envelope carries a legacy (v1) field"


class UnsupportedVersionError(EnvelopeError):
    """``protocol_version`` is not the one this side speaks."""

    code = codes.UNSUPPORTED_VERSION
    default_message = "unsupported protocol version"


class UnsupportedContractError(EnvelopeError):
    """An execution contract this side does not implement."""

    code = codes.UNSUPPORTED_CONTRACT
    default_message = "unsupported execution contract"


class OperationNotAllowedError(EnvelopeError):
    """An operation outside the protocol's (or the task's) allow-list."""

    code = codes.OPERATION_NOT_ALLOWED
    default_message = "operation not allowed"


class TooLargeError(EnvelopeError):
    """The envelope is larger than ``max_envelope_bytes``."""

    code = codes.TOO_LARGE
    default_message = "the envelope is too large"


class EncryptionRequiredError(EnvelopeError):
    """A plain payload arrived while this side requires sealed payloads."""

    code = codes.ENCRYPTION_REQUIRED
    default_message = "the payload must be sealed"


class InvalidSignatureError(EnvelopeError):
    """The token is not a compact JWS, uses another algorithm, or its signature does not verify."""

    code = codes.INVALID_SIGNATURE
    default_message = "the token signature is invalid"


class UnknownKeyError(EnvelopeError):
    """A key id (token ``kid`` or sealed ``kid``) this side holds no key for."""

    code = codes.UNKNOWN_KEY
    default_message = "unknown key id"


class WrongIssuerError(EnvelopeError):
    """The token's issuer is not in the accepted list."""

    code = codes.WRONG_ISSUER
    default_message = "the token issuer is not accepted"


class WrongAudienceError(EnvelopeError):
    """The token is meant for someone else."""

    code = codes.WRONG_AUDIENCE
    default_message = "the token audience does not match"


class NotYetValidError(EnvelopeError):
    """``nbf`` or ``iat`` lies in the future beyond the leeway."""

    code = codes.NOT_YET_VALID
    default_message = "the token is not yet valid"


class ExpiredError(EnvelopeError):
    """The deadline (``expires_at`` = token ``exp``) has passed beyond the leeway."""

    code = codes.EXPIRED
    default_message = "the request deadline has passed"


class TokenLifetimeError(EnvelopeError):
    """A token that lives longer than its own timeout (plus leeway) or than the fleet's maximum lifetime."""

    code = codes.TOKEN_LIFETIME
    default_message = "the token lives longer than allowed"


class ClaimMismatchError(EnvelopeError):
    """A signed claim differs from the envelope, the lane it arrived on, or the task that runs it."""

    code = codes.CLAIM_MISMATCH
    default_message = "a signed claim does not match the envelope"


class PayloadHashMismatchError(EnvelopeError):
    """The params are not the ones the token signed."""

    code = codes.PAYLOAD_HASH_MISMATCH
    default_message = "the params do not match the signed hash"


class DecryptFailedError(EnvelopeError):
    """AES-GCM refused to open a sealed part (wrong key, tampered, truncated, other purpose)."""

    code = codes.DECRYPT_FAILED
    default_message = "the sealed part could not be opened"


class ReplayedError(EnvelopeError):
    """A different message reuses a ``jti`` already seen."""

    code = codes.REPLAYED
    default_message = "the request id was already used by another message"


class IdempotencyConflictError(EnvelopeError):
    """The idempotency key was already used with different params."""

    code = codes.IDEMPOTENCY_CONFLICT
    default_message = "the idempotency key was already used with different params"


class KeyConfigurationError(EnvelopeError):
    """Keys are missing, malformed, or of the wrong kind for the configured algorithm."""

    code = codes.KEY_CONFIGURATION
    default_message = "the protocol keys are misconfigured"


class FleetError(Exception):
    """Root of every error a caller sees: ``code`` says which (a ``codes`` constant), ``retryable`` whether
    submitting the request again may succeed; the message names fields and ids, never payload or keys."""

    code: str = PROVIDER_ERROR
    retryable: bool = False
    default_message: str = "the fleet reported an error"

    def __new__(cls, message: str | None = None, *, code: str | None = None, **_: Any) -> Self:
        """The class of ``code``: ``FleetError(msg, code="fleet_timeout")`` is a ``FleetTimeout``."""
        target = _class_for_new(cls, code)
        return cast(Self, Exception.__new__(target))

    def __init__(
        self,
        message: str | None = None,
        *,
        code: str | None = None,
        retryable: bool | None = None,
        error_class: str | None = None,
        request_id: str | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> None:
        self.message = message or self.default_message
        super().__init__(self.message)
        if code is not None:
            self.code = code
        if retryable is not None and type(self) is FleetError:  # a code this side does not know: keep its flag
            self.retryable = retryable
        self.error_class = error_class
        self.request_id = request_id
        self.metadata: dict[str, Any] = dict(metadata or {})

    def __str__(self) -> str:
        return self.message

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(code={self.code!r}, message={self.message!r}, retryable={self.retryable!r}, "
            f"error_class={self.error_class!r})"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (type(self), self.message, dict(self.__dict__)))

    @property
    def umbrella(self) -> str:
        """The seeds' umbrella code for this error."""
        return umbrella_code(self.code)


def _rebuild(cls: type[FleetError], message: str, state: dict[str, Any]) -> FleetError:
    """Unpickle a ``FleetError`` (its constructor takes keywords that ``Exception`` pickling drops)."""
    error = Exception.__new__(cls)
    Exception.__init__(error, message)
    error.__dict__.update(state)
    return error


class InvalidRequest(FleetError):
    """The request's own arguments are wrong (refused at submit, or by the worker's validation)."""

    code = codes.INVALID_REQUEST
    default_message = "the request is invalid"


class NoFleetQueue(FleetError):
    """No live lane serves the model, the instance, or the capabilities the request needs."""

    code = codes.NO_FLEET_QUEUE
    default_message = "no live worker serves this request"


class FleetUnavailable(FleetError):
    """Every instance serving the model has an open circuit; it may close shortly."""

    code = codes.FLEET_UNAVAILABLE
    retryable = True
    default_message = "no instance of the model can serve now"


class Backpressure(FleetError):
    """The lane already holds as many waiting requests as it may."""

    code = codes.FLEET_BACKPRESSURE
    retryable = True
    default_message = "the lane is full; try later"


class PublishFailed(FleetError):
    """The broker or Redis could not be reached at submit: nothing was published."""

    code = codes.FLEET_PUBLISH_FAILED
    retryable = True
    default_message = "could not publish the request"


class FleetTimeout(FleetError):
    """No answer (or no stream end) by the request's deadline: no worker took it in time, or it ran too long.

    Retryable: the fleet may have room for the same request again (an idempotency key returns the first answer).
    """

    code = codes.FLEET_TIMEOUT
    retryable = True
    default_message = "no result before the request's deadline"


class ResultUnavailable(FleetError):
    """The result store is unreachable while waiting; ``get()`` again once it is back."""

    code = codes.FLEET_RESULT_UNAVAILABLE
    retryable = True
    default_message = "the result store is unreachable; try get() again"


class DeadLettered(FleetError):
    """No worker could serve the request within the lane's delivery limit; it went to the dead-letter queue."""

    code = codes.FLEET_DEAD_LETTERED
    default_message = "no worker could serve the request; it was dead-lettered"


class Cancelled(FleetError):
    """The stream was cancelled by its producer."""

    code = codes.CANCELLED
    default_message = "cancelled"


class ResponseForged(FleetError):
    """What was read was not written by a fleet worker for this request (or lane, or operation)."""

    code = codes.RESPONSE_FORGED
    default_message = "the answer was not written by a fleet worker for this request"


class StreamGap(FleetError):
    """The stream lost entries (trimmed or deleted) before the reader got to them."""

    code = codes.STREAM_GAP
    default_message = "the stream lost entries"


class RequestRefused(FleetError):
    """The protocol refused the request or its answer; ``code`` is the ``EnvelopeError``'s (never retryable)."""

    code = codes.MALFORMED
    default_message = "the envelope was refused"
    family = codes.ENVELOPE_CODES


class KeyConfiguration(RequestRefused):
    """This side's keys are missing, malformed or of the wrong kind (e.g. no response verify keys)."""

    code = codes.KEY_CONFIGURATION
    default_message = "the protocol keys are misconfigured"


class ProviderFailed(FleetError):
    """The worker's vLLM instance failed; the subclasses say how (``provider_error``: an unexpected failure)."""

    code = codes.PROVIDER_ERROR
    default_message = "the worker failed"


class ProviderBadRequest(ProviderFailed):
    """vLLM refused the request (400/422: validation, context too long); its message is kept."""

    code = codes.BAD_REQUEST


class ProviderUnauthorized(ProviderFailed):
    """The instance refused the worker's api key (401/403)."""

    code = codes.UNAUTHORIZED


class ProviderNotFound(ProviderFailed):
    """Unknown model, or a route the model cannot serve (404)."""

    code = codes.NOT_FOUND


class ProviderBusy(ProviderFailed):
    """The engine is busy or not ready (503)."""

    code = codes.SERVER_BUSY
    retryable = True


class ProviderServerError(ProviderFailed):
    """Another 5xx from the instance."""

    code = codes.SERVER_ERROR
    retryable = True


class ProviderHttpError(ProviderFailed):
    """Another HTTP error status."""

    code = codes.HTTP_ERROR


class ProviderTimeout(ProviderFailed):
    """An HTTP timeout at the instance (the worker's retries ran out)."""

    code = codes.TIMEOUT
    retryable = True


class ProviderUnreachable(ProviderFailed):
    """The instance could not be reached, or the connection broke before an answer."""

    code = codes.CONNECTION_ERROR
    retryable = True


class ProviderStreamInterrupted(ProviderFailed):
    """The instance dropped a stream mid-way."""

    code = codes.STREAM_INTERRUPTED
    retryable = True


class ProviderStreamError(ProviderFailed):
    """An error frame without an HTTP status inside a streamed answer."""

    code = codes.STREAM_ERROR
    retryable = True


class ProviderGenerationAborted(ProviderFailed):
    """vLLM ended the generation itself (``finish_reason: "abort"``)."""

    code = codes.GENERATION_ABORTED
    retryable = True


class ProviderInvalidResponse(ProviderFailed):
    """The instance answered with something that is not vLLM's wire format."""

    code = codes.INVALID_RESPONSE


class ProviderUnsupported(ProviderFailed):
    """The model or server cannot serve this operation."""

    code = codes.UNSUPPORTED_CAPABILITY


class ProviderMisconfigured(ProviderFailed):
    """The worker's settings for the instance cannot work (no URL, bad key)."""

    code = codes.CONFIGURATION_ERROR


FLEET_ERROR_CLASSES: dict[str, type[FleetError]] = {
    cls.code: cls
    for cls in (
        InvalidRequest,
        NoFleetQueue,
        FleetUnavailable,
        Backpressure,
        PublishFailed,
        FleetTimeout,
        ResultUnavailable,
        DeadLettered,
        Cancelled,
        ResponseForged,
        StreamGap,
        KeyConfiguration,
        ProviderFailed,
        ProviderBadRequest,
        ProviderUnauthorized,
        ProviderNotFound,
        ProviderBusy,
        ProviderServerError,
        ProviderHttpError,
        ProviderTimeout,
        ProviderUnreachable,
        ProviderStreamInterrupted,
        ProviderStreamError,
        ProviderGenerationAborted,
        ProviderInvalidResponse,
        ProviderUnsupported,
        ProviderMisconfigured,
    )
}
"""The class of every fixed caller code; the other envelope codes are ``RequestRefused``."""


def fleet_error_class(code: str) -> type[FleetError]:
    """The ``FleetError`` class a caller code raises (a plain ``FleetError`` for a code this side does not know)."""
    found = FLEET_ERROR_CLASSES.get(code)
    if found is not None:
        return found
    if code in codes.ENVELOPE_CODES:
        return RequestRefused
    return FleetError


def _class_for_new(cls: type[FleetError], code: str | None) -> type[FleetError]:
    """The class ``cls(..., code=code)`` builds; refuses a code that contradicts a subclass's own."""
    if code is None:
        return ProviderFailed if cls is FleetError else cls
    target = fleet_error_class(code)
    if issubclass(target, cls):
        return target
    if cls is RequestRefused and code in codes.ENVELOPE_CODES:
        return cls
    raise ValueError(f"{cls.__name__} has code {cls.code!r}, not {code!r}")


def response_forged(message: str | None = None) -> ResponseForged:
    """The typed error a caller gets instead of anything no fleet worker signed for its request."""
    return ResponseForged(message)


def as_fleet_error(exc: EnvelopeError) -> FleetError:
    """The same refusal as a ``FleetError`` (what callers catch): ``RequestRefused`` with the refusal's code."""
    metadata = {"field": exc.field} if exc.field else None
    code = exc.code if exc.code in codes.ENVELOPE_CODES else codes.MALFORMED
    return RequestRefused(exc.message, code=code, metadata=metadata)


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
