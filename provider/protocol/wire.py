"""What both directions of the codec share: wire constants, strict JSON, sizes, hashes, the verified request
and ``CodecCore`` (the settings, the keys, loading and validating an envelope)."""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypeGuard, TypeVar

from pydantic import BaseModel, ValidationError

from provider.protocol.canonical import (
    CanonicalizationError,
    canonical_json,
    compact_json,
    sha256_hex,
)
from provider.protocol.envelope import (
    MAX_TIMEOUT_S,
)
from provider.protocol.errors import (
    KeyConfigurationError,
    MalformedError,
    TooLargeError,
)
from provider.protocol.keys import KeyRing
from provider.protocol.settings import SecuritySettings

__all__ = [
    "ANSWER_SIGNATURE_PREFIX",
    "DEFAULT_PROVIDER",
    "REPLY_TO_PREFIX",
    "SEALED_CONTEXT_FIELDS",
    "WORKER_SIGNATURE_FIELD",
    "CodecCore",
    "VerifiedRequest",
]

DEFAULT_PROVIDER = "vllm"
# ``reply_to`` default: the Celery result of the task whose id is the request id.
REPLY_TO_PREFIX = "celery:"
# ``exp`` is a whole second; ``expires_at`` has milliseconds: they agree within this many seconds.
EXP_TOLERANCE_S = 1.0
# NumericDate claims beyond this (about the year 5138) are not times but attacks on float conversion.
MAX_NUMERIC_DATE_S = 1e11
SAFE_FIELD = re.compile(r"[A-Za-z_][A-Za-z0-9_.\[\]]{0,127}")
_EMPTY_OBJECT_HASH = sha256_hex({})
# Sealed with a response's payload: the caller's contexts may hold secrets (bearer tokens, user ids).
SEALED_CONTEXT_FIELDS = ("message_context", "trace_context")
# A worker's signature over an answer covers this prefix and the RFC 8785 form of the envelope without it.
WORKER_SIGNATURE_FIELD = "worker_signature"
ANSWER_SIGNATURE_PREFIX = b"llm.fleet.answer.v2\n"
_DECODER = json.JSONDecoder()
# The size check bounds an envelope from string lengths; it serializes only when the bound is over the limit.
MAX_JSON_BYTES_PER_CHAR = 6
_Model = TypeVar("_Model", bound=BaseModel)


def _reject_constant(name: str) -> None:
    raise MalformedError("the envelope is not JSON (NaN or Infinity)")


def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object, refusing duplicate keys (parsers disagree on which one wins)."""
    result = dict(pairs)
    if len(result) != len(pairs):
        raise MalformedError("the envelope has a duplicate key")
    return result


def loads(text: str | bytes, what: str) -> Any:
    """Strict JSON: no duplicate keys, no NaN/Infinity; MalformedError otherwise."""
    try:
        return json.loads(text, object_pairs_hook=_unique_pairs, parse_constant=_reject_constant)
    except (ValueError, RecursionError):
        raise MalformedError(f"the {what} is not valid JSON") from None


def loads_signed(data: bytes, what: str) -> Any:
    """JSON that is authenticated already (token claims, opened sealed parts): the plain C decoder."""
    try:
        return _DECODER.decode(data.decode("utf-8"))
    except (ValueError, RecursionError):
        raise MalformedError(f"the {what} is not valid JSON") from None


def json_size(value: object) -> int:
    """Bytes of the compact UTF-8 JSON of a value."""
    text = compact_json(value)
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def json_size_bound(envelope: Mapping[Any, Any]) -> int:
    """An upper bound of an envelope's ``_json_size`` from string lengths (a character is at most 6 bytes).

    Only the envelope and the objects directly in it are walked; anything else is serialized.
    """
    bound = 2
    for key, item in envelope.items():
        bound += MAX_JSON_BYTES_PER_CHAR * len(key) + 4
        kind = type(item)
        if kind is str:
            bound += MAX_JSON_BYTES_PER_CHAR * len(item) + 2
        elif kind is dict:
            bound += 2
            for inner_key, inner in item.items():
                bound += MAX_JSON_BYTES_PER_CHAR * len(inner_key) + 4
                if type(inner) is str:
                    bound += MAX_JSON_BYTES_PER_CHAR * len(inner) + 2
                else:
                    bound += json_size(inner)
        else:
            bound += json_size(item)
    return bound


def is_number(value: object) -> TypeGuard[int | float]:
    return type(value) is int or (type(value) is float and math.isfinite(value))


def normalize(value: Mapping[str, Any] | None, what: str) -> dict[str, Any]:
    """A JSON object as the wire will carry it (keys as strings, tuples as lists), copied."""
    if value is None:
        return {}
    try:
        normalized = json.loads(canonical_json(dict(value)))
    except (CanonicalizationError, TypeError, ValueError):
        raise MalformedError(f"{what} is not a JSON object", field=what) from None
    if not isinstance(normalized, dict):
        raise MalformedError(f"{what} is not a JSON object", field=what)
    return normalized


def object_hash(value: Mapping[str, Any]) -> str:
    """The hashed-claim value of a JSON object."""
    if not value:
        return _EMPTY_OBJECT_HASH
    try:
        return sha256_hex(value)
    except CanonicalizationError:
        raise MalformedError("a hashed field has no canonical JSON form") from None


def describe(exc: ValidationError) -> tuple[str, str | None]:
    """A message naming the refused fields (never their values), and the first of them."""
    names: list[str] = []
    for error in exc.errors(include_input=False, include_url=False):
        loc = error.get("loc") or ()
        head = str(loc[0]) if loc else ""
        if not loc and error.get("type") == "value_error":
            name = str(error.get("msg", "")).removeprefix("Value error, ")  # our own validators' words
        else:
            name = head if SAFE_FIELD.fullmatch(head) else "(field)"
        if name not in names:
            names.append(name)
    if not names:
        return "the envelope does not match the schema", None
    first = names[0] if SAFE_FIELD.fullmatch(names[0]) else None
    return f"invalid or missing fields: {', '.join(names[:8])}", first


@dataclass(frozen=True, slots=True, repr=False)
class VerifiedRequest:
    """A request that passed every check; ``params`` is the plaintext. Repr shows ids only."""

    request_id: str
    correlation_id: str
    idempotency_key: str
    operation: str
    provider: str
    provider_instance: str
    model: str | None
    lane: str
    task_name: str
    reply_to: str
    params: dict[str, Any]
    timeout_seconds: float
    expires_at: str
    expires_at_epoch: float
    issued_at_epoch: float
    caller: dict[str, Any]
    message_context: dict[str, Any]
    trace_context: dict[str, Any]
    token_digest: str
    params_hash: str
    caller_hash: str
    sealed: bool
    claims: dict[str, Any] = field(default_factory=dict)

    @property
    def jti(self) -> str:
        """The token id (the request id)."""
        return self.request_id

    @property
    def idempotency_scope(self) -> str:
        """Idempotency keys are scoped to (caller, operation)."""
        return f"{self.caller_hash}:{self.operation}"

    def time_left_s(self, now: float | None = None) -> float:
        """Seconds until the deadline (negative when past it)."""
        return self.expires_at_epoch - (time.time() if now is None else now)

    def __repr__(self) -> str:
        return (
            f"VerifiedRequest(request_id={self.request_id!r}, operation={self.operation!r}, "
            f"lane={self.lane!r}, model={self.model!r}, provider_instance={self.provider_instance!r})"
        )


class CodecCore:
    """The settings and keys every direction of the codec uses; loads and validates envelopes."""

    def __init__(
        self, security: SecuritySettings, keyring: KeyRing | None = None, *, max_lifetime_s: float | None = None
    ) -> None:
        self._security = security
        # The longest a token may live: the setting, else what the caller (the runtime: the longest deadline) says.
        self._max_lifetime_s = security.max_token_lifetime_s or max_lifetime_s or MAX_TIMEOUT_S
        self._keys = keyring if keyring is not None else KeyRing.from_settings(security)
        if self._keys.algorithm != security.algorithm:
            raise KeyConfigurationError("the key ring's algorithm differs from the configured one")
        self._algorithm = security.algorithm
        self._algorithms = [security.algorithm]
        self._issuers = frozenset(security.accepted_issuers or [security.issuer])
        self._leeway_s = security.leeway_s
        self._max_bytes = security.max_envelope_bytes
        self._encrypt = security.encrypt

    @property
    def keyring(self) -> KeyRing:
        """The parsed keys."""
        return self._keys

    @property
    def security(self) -> SecuritySettings:
        """The settings this codec was built with."""
        return self._security

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(algorithm={self._algorithm!r}, encrypt={self._encrypt!r}, keyring={self._keys!r})"
        )

    def _load(self, raw: object) -> dict[str, Any]:
        """The envelope as a dict, within the size limit; TooLargeError or MalformedError otherwise."""
        if isinstance(raw, bytes | bytearray | memoryview):
            data_bytes = bytes(raw)
            if len(data_bytes) > self._max_bytes:
                raise TooLargeError(field="envelope")
            try:
                loaded = loads(data_bytes.decode("utf-8"), "envelope")
            except UnicodeDecodeError:
                raise MalformedError("the envelope is not UTF-8") from None
        elif isinstance(raw, str):
            if len(raw) > self._max_bytes or len(raw.encode("utf-8", "surrogatepass")) > self._max_bytes:
                raise TooLargeError(field="envelope")
            loaded = loads(raw, "envelope")
        elif isinstance(raw, dict):
            try:
                too_large = json_size_bound(raw) > self._max_bytes and json_size(raw) > self._max_bytes
            except (TypeError, ValueError, RecursionError):
                raise MalformedError("the envelope is not JSON") from None
            if too_large:
                raise TooLargeError(field="envelope")
            loaded = raw
        else:
            raise MalformedError("the envelope must be a JSON object")
        if not isinstance(loaded, dict):
            raise MalformedError("the envelope must be a JSON object")
        return loaded

    @staticmethod
    def _validate(model: type[_Model], data: Mapping[str, Any]) -> _Model:
        """The model, or MalformedError naming the refused fields."""
        try:
            return model.model_validate(data)
        except ValidationError as exc:
            message, first = describe(exc)
            raise MalformedError(message, field=first) from None
