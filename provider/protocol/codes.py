"""Every error code a caller can see (``FleetError.code``), as named constants: raise sites name these, never literals.

Three families: what the fleet itself reports (submit, wait, stream), the protocol's refusals of an envelope
(the ``EnvelopeError`` codes), and the vLLM instance's failures as the worker reports them. ``CALLER_CODES`` is
the documented list; a test checks that every provider and envelope error maps to one of them.
"""

from __future__ import annotations

# The fleet's own codes (submit, wait, stream).
INVALID_REQUEST = "invalid_request"
NO_FLEET_QUEUE = "no_fleet_queue"
FLEET_UNAVAILABLE = "fleet_unavailable"
FLEET_BACKPRESSURE = "fleet_backpressure"
FLEET_PUBLISH_FAILED = "fleet_publish_failed"
FLEET_TIMEOUT = "fleet_timeout"
FLEET_RESULT_UNAVAILABLE = "fleet_result_unavailable"
FLEET_DEAD_LETTERED = "fleet_dead_lettered"
CANCELLED = "cancelled"
RESPONSE_FORGED = "response_forged"
STREAM_GAP = "stream_gap"

FLEET_CODES = frozenset(
    {
        INVALID_REQUEST,
        NO_FLEET_QUEUE,
        FLEET_UNAVAILABLE,
        FLEET_BACKPRESSURE,
        FLEET_PUBLISH_FAILED,
        FLEET_TIMEOUT,
        FLEET_RESULT_UNAVAILABLE,
        FLEET_DEAD_LETTERED,
        CANCELLED,
        RESPONSE_FORGED,
        STREAM_GAP,
    }
)

# The protocol's refusals of an envelope (one ``EnvelopeError`` class each).
MALFORMED = "malformed"
LEGACY_FIELD = "legacy_field"
UNSUPPORTED_VERSION = "unsupported_version"
UNSUPPORTED_CONTRACT = "unsupported_contract"
OPERATION_NOT_ALLOWED = "operation_not_allowed"
TOO_LARGE = "too_large"
ENCRYPTION_REQUIRED = "encryption_required"
INVALID_SIGNATURE = "invalid_signature"
UNKNOWN_KEY = "unknown_key"
WRONG_ISSUER = "wrong_issuer"
WRONG_AUDIENCE = "wrong_audience"
NOT_YET_VALID = "not_yet_valid"
EXPIRED = "expired"
TOKEN_LIFETIME = "token_lifetime"  # noqa: S105 (an error code, not a secret)
CLAIM_MISMATCH = "claim_mismatch"
PAYLOAD_HASH_MISMATCH = "payload_hash_mismatch"
DECRYPT_FAILED = "decrypt_failed"
REPLAYED = "replayed"
IDEMPOTENCY_CONFLICT = "idempotency_conflict"
KEY_CONFIGURATION = "key_configuration"

ENVELOPE_CODES = frozenset(
    {
        MALFORMED,
        LEGACY_FIELD,
        UNSUPPORTED_VERSION,
        UNSUPPORTED_CONTRACT,
        OPERATION_NOT_ALLOWED,
        TOO_LARGE,
        ENCRYPTION_REQUIRED,
        INVALID_SIGNATURE,
        UNKNOWN_KEY,
        WRONG_ISSUER,
        WRONG_AUDIENCE,
        NOT_YET_VALID,
        EXPIRED,
        TOKEN_LIFETIME,
        CLAIM_MISMATCH,
        PAYLOAD_HASH_MISMATCH,
        DECRYPT_FAILED,
        REPLAYED,
        IDEMPOTENCY_CONFLICT,
        KEY_CONFIGURATION,
    }
)

# The vLLM instance's failures, as a worker reports them (``provider.vllm.errors``).
PROVIDER_ERROR = "provider_error"
BAD_REQUEST = "bad_request"
UNAUTHORIZED = "unauthorized"
NOT_FOUND = "not_found"
SERVER_BUSY = "server_busy"
SERVER_ERROR = "server_error"
HTTP_ERROR = "http_error"
TIMEOUT = "timeout"
CONNECTION_ERROR = "connection_error"
STREAM_INTERRUPTED = "stream_interrupted"
STREAM_ERROR = "stream_error"
GENERATION_ABORTED = "generation_aborted"
INVALID_RESPONSE = "invalid_response"
UNSUPPORTED_CAPABILITY = "unsupported_capability"
CONFIGURATION_ERROR = "configuration_error"

PROVIDER_CODES = frozenset(
    {
        PROVIDER_ERROR,
        BAD_REQUEST,
        UNAUTHORIZED,
        NOT_FOUND,
        SERVER_BUSY,
        SERVER_ERROR,
        HTTP_ERROR,
        TIMEOUT,
        CONNECTION_ERROR,
        STREAM_INTERRUPTED,
        STREAM_ERROR,
        GENERATION_ABORTED,
        INVALID_RESPONSE,
        UNSUPPORTED_CAPABILITY,
        CONFIGURATION_ERROR,
    }
)

# The seeds' umbrella codes (an error envelope's ``category``).
POLICY_ERROR = "policy_error"

CALLER_CODES = FLEET_CODES | ENVELOPE_CODES | PROVIDER_CODES
