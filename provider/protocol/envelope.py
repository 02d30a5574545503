"""The wire envelopes of fleet protocol v2 as strict pydantic models, and the legacy-field check.

A request carries its params in the clear (``params``) or sealed (``sealed_params``), never both. A
response carries its payload fields in the clear or sealed (``sealed_body``); ``usage`` and
``finish_reason`` stay in the clear for metering. Nil values are dropped on the wire; a null reads as absent.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Annotated, Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

from provider.protocol.errors import LegacyFieldError, MalformedError

__all__ = [
    "ALLOWED_OPERATIONS",
    "ERROR_MESSAGE_TYPE",
    "EXECUTION_CONTRACTS",
    "IDENT_PATTERN",
    "INFERENCE_OPERATIONS",
    "LANE_PATTERN",
    "LEGACY_FIELDS",
    "MANAGEMENT_OPERATIONS",
    "MAX_ERROR_MESSAGE_CHARS",
    "MAX_NESTING_DEPTH",
    "MAX_TIMEOUT_S",
    "NAME_PATTERN",
    "OPERATIONS",
    "PLAIN_RESPONSE_FIELDS",
    "PROTOCOL_VERSION",
    "PROVIDER_PATTERN",
    "REQUEST_ID_PATTERN",
    "REQUEST_MESSAGE_TYPE",
    "RESPONSE_MESSAGE_TYPE",
    "SEALED_RESPONSE_FIELDS",
    "ErrorEnvelope",
    "Operation",
    "RequestEnvelope",
    "ResponseEnvelope",
    "SealedBox",
    "WorkerSignature",
    "check_legacy_fields",
    "format_expires_at",
    "parse_expires_at",
]

PROTOCOL_VERSION = 2
REQUEST_MESSAGE_TYPE = "llm.fleet.request"
RESPONSE_MESSAGE_TYPE = "llm.fleet.response"
ERROR_MESSAGE_TYPE = "llm.fleet.error"
# Execution contracts this fleet serves: none. No product path pins work to an offering id, so an exact-offering
# request (``exact_offering_v1``, fleet-protocol.md) is refused with ``UnsupportedContractError``, never run loosely.
EXECUTION_CONTRACTS: frozenset[str] = frozenset()
LEGACY_FIELDS = frozenset({"schema_version", "request_type", "fleet_correlation_id"})
MAX_NESTING_DEPTH = 64
MAX_TIMEOUT_S = 7 * 24 * 3600.0
MAX_TOKEN_CHARS = 16_384
MAX_ERROR_MESSAGE_CHARS = 1024

# Every operation, written once: the inference ones, then the management ones in the order the CLI and docs use
# (a task ``vllm.<operation>`` each, ``tasks/fleet.py``; a handler each, ``tasks/management.py``).
Operation = Literal[
    "chat",
    "stream_chat",
    "embed",
    "health",
    "readiness",
    "version",
    "list_models",
    "is_sleeping",
    "sleep",
    "wake_up",
    "reset_prefix_cache",
    "reset_mm_cache",
    "discover",
]
OPERATIONS: tuple[str, ...] = get_args(Operation)
ALLOWED_OPERATIONS: frozenset[str] = frozenset(OPERATIONS)
INFERENCE_OPERATIONS = frozenset({"chat", "stream_chat", "embed"})  # a model serves these (lanes, slots)
MANAGEMENT_OPERATIONS: tuple[str, ...] = tuple(op for op in OPERATIONS if op not in INFERENCE_OPERATIONS)

# Fields whose payload is sealed in a response when encryption is on; the rest of the body stays in the clear.
SEALED_RESPONSE_FIELDS = ("content", "tool_calls", "metadata", "result", "reasoning")
PLAIN_RESPONSE_FIELDS = ("usage", "finish_reason")

_ISO_UTC = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(?:\.\d{1,6})?(?:Z|\+00:00)$")


def parse_expires_at(value: str) -> float:
    """Epoch seconds of an ISO 8601 UTC timestamp (``...Z`` or ``...+00:00``); ValueError otherwise."""
    if _ISO_UTC.fullmatch(value) is None:
        raise ValueError("expires_at must be ISO 8601 UTC")
    return datetime.fromisoformat(value).timestamp()


def format_expires_at(epoch_s: float) -> str:
    """ISO 8601 UTC with milliseconds (``2025-01-02T03:04:05.678Z``) of epoch seconds, rounded to the ms."""
    millis = round(epoch_s * 1000)
    moment = datetime.fromtimestamp(millis // 1000, UTC)
    return f"{moment:%Y-%m-%dT%H:%M:%S}.{millis % 1000:03d}Z"


# The shapes of ids and names; the same patterns check ids an error envelope copies from unverified input.
REQUEST_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
IDENT_PATTERN = re.compile(r"^[\x20-\x7e]{1,256}$")
NAME_PATTERN = re.compile(r"^[^\x00-\x1f\x7f]{1,512}$")
LANE_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,254}$")
PROVIDER_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")

RequestId = Annotated[str, StringConstraints(pattern=REQUEST_ID_PATTERN.pattern)]
Ident = Annotated[str, StringConstraints(pattern=IDENT_PATTERN.pattern)]
Name = Annotated[str, StringConstraints(pattern=NAME_PATTERN.pattern)]
LaneName = Annotated[str, StringConstraints(pattern=LANE_PATTERN.pattern)]
ProviderName = Annotated[str, StringConstraints(pattern=PROVIDER_PATTERN.pattern)]
Kid = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")]
Code = Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9_.]{0,63}$")]
ContractName = Annotated[str, StringConstraints(pattern=r"^[a-z0-9_.-]{1,64}$")]
Token = Annotated[str, StringConstraints(min_length=1, max_length=MAX_TOKEN_CHARS)]
Base64Text = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9+/]*={0,2}$")]
ExpiresAt = Annotated[str, StringConstraints(pattern=_ISO_UTC.pattern)]
JsonObject = dict[str, Any]

_STRICT = ConfigDict(strict=True, extra="forbid", frozen=True)


class SealedBox(BaseModel):
    """An AES-256-GCM sealed part: ``{"alg": "A256GCM", "kid", "nonce", "ciphertext"}`` (base64)."""

    model_config = _STRICT

    alg: Literal["A256GCM"]
    kid: Kid
    nonce: Annotated[Base64Text, Field(max_length=24)]
    ciphertext: Base64Text


class WorkerSignature(BaseModel):
    """A worker's Ed25519 signature over a response or error envelope: ``{"kid", "sig"}`` (base64url)."""

    model_config = _STRICT

    kid: Kid
    sig: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_-]{86}$")]


class RequestEnvelope(BaseModel):
    """``llm.fleet.request``: what travels on a lane."""

    model_config = _STRICT

    message_type: Literal["llm.fleet.request"]
    protocol_version: Literal[2]
    request_id: RequestId
    correlation_id: Ident
    idempotency_key: Ident
    operation: Operation
    provider: ProviderName
    provider_instance: Name
    model: Name | None = None
    params: JsonObject | None = None
    sealed_params: SealedBox | None = None
    reply_to: Name
    message_context: JsonObject
    caller: JsonObject
    trace_context: JsonObject
    signed_token: Token
    timeout_seconds: Annotated[float, Field(gt=0, le=MAX_TIMEOUT_S, allow_inf_nan=False)]
    expires_at: ExpiresAt
    routing_key: LaneName
    execution_contract: ContractName | None = None
    offering_id: Name | None = None

    @model_validator(mode="after")
    def _check(self) -> RequestEnvelope:
        """Params in the clear or sealed (exactly one); ``expires_at`` a real UTC time."""
        if (self.params is None) == (self.sealed_params is None):
            raise ValueError("exactly one of params and sealed_params is required")
        parse_expires_at(self.expires_at)
        return self


class ResponseEnvelope(BaseModel):
    """``llm.fleet.response``: the answer, its payload sealed when encryption is on."""

    model_config = _STRICT

    message_type: Literal["llm.fleet.response"]
    protocol_version: Literal[2] = 2
    request_id: RequestId
    correlation_id: Ident
    reply_to: Name
    idempotency_key: Ident | None = None
    operation: Operation | None = None
    provider: ProviderName | None = None
    provider_instance: Name | None = None
    model: Name | None = None
    routing_key: LaneName | None = None
    message_context: JsonObject | None = None
    trace_context: JsonObject | None = None
    content: str | None = None
    tool_calls: list[JsonObject] | None = None
    usage: JsonObject | None = None
    finish_reason: str | None = None
    metadata: JsonObject | None = None
    result: Any = None
    reasoning: str | None = None
    sealed_body: SealedBox | None = None
    worker_signature: WorkerSignature | None = None

    @model_validator(mode="after")
    def _sealed_or_plain(self) -> ResponseEnvelope:
        """A sealed body replaces the payload fields; it never sits beside them."""
        if self.sealed_body is not None and any(getattr(self, f) is not None for f in SEALED_RESPONSE_FIELDS):
            raise ValueError("sealed_body cannot sit beside plain payload fields")
        return self


class ErrorEnvelope(BaseModel):
    """``llm.fleet.error``: a typed refusal or failure; the ids are there when they were known."""

    model_config = _STRICT

    message_type: Literal["llm.fleet.error"]
    protocol_version: Literal[2] = 2
    code: Code
    category: Literal["configuration_error", "policy_error", "provider_error"]
    message: Annotated[str, StringConstraints(max_length=MAX_ERROR_MESSAGE_CHARS)]
    error_class: Annotated[str, StringConstraints(max_length=128)]
    retryable: bool
    metadata: JsonObject | None = None
    request_id: RequestId | None = None
    correlation_id: Ident | None = None
    reply_to: Name | None = None
    idempotency_key: Ident | None = None
    operation: Operation | None = None
    provider: ProviderName | None = None
    provider_instance: Name | None = None
    model: Name | None = None
    routing_key: LaneName | None = None
    message_context: JsonObject | None = None
    trace_context: JsonObject | None = None
    worker_signature: WorkerSignature | None = None


_CONTAINERS = (dict, list)


def _has_legacy(value: object, depth: int) -> bool:
    """Whether a legacy field name is a key anywhere in value (fast; no path)."""
    if depth > MAX_NESTING_DEPTH:
        raise MalformedError("the envelope is nested too deeply")
    if isinstance(value, dict):
        if not LEGACY_FIELDS.isdisjoint(value):
            return True
        for item in value.values():
            if isinstance(item, _CONTAINERS) and _has_legacy(item, depth + 1):
                return True
    elif isinstance(value, list):
        for item in value:
            if isinstance(item, _CONTAINERS) and _has_legacy(item, depth + 1):
                return True
    return False


def _legacy_path(value: object, path: str) -> str | None:
    """The dotted path of the first legacy field in value (slow; only once one is known to be there)."""
    if isinstance(value, dict):
        for key in value:
            if key in LEGACY_FIELDS:
                return f"{path}.{key}" if path else str(key)
        for key, item in value.items():
            found = _legacy_path(item, f"{path}.{key}" if path else str(key))
            if found is not None:
                return found
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found = _legacy_path(item, f"{path}[{index}]")
            if found is not None:
                return found
    return None


def check_legacy_fields(value: object, *, where: str = "") -> None:
    """LegacyFieldError when a v1 field name is a key at any depth; MalformedError when nested too deeply."""
    if _has_legacy(value, 0):
        path = _legacy_path(value, where) or where
        leaf = path.rsplit(".", 1)[-1]
        raise LegacyFieldError(f"legacy (v1) field {leaf!r} is not accepted", field=path)
