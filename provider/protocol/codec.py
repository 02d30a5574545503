"""Build, verify and answer fleet protocol v2 envelopes: the one place tokens are signed and checked.

The producer signs a token (PyJWT; the algorithm fixed by configuration, the key named by ``kid``) that
binds the issuer, the audience, the lane, the task, the request id (as ``jti``), the times, every scalar field
of the envelope, and a SHA-256 of the RFC 8785 form of ``message_context``, ``params`` (the plaintext),
``caller`` and ``trace_context``. No prompt text is in the token. Params are sealed (AES-256-GCM) when
encryption is on; the sealed plaintext is the canonical JSON of the params, so its hash is ``params_hash``.

``verify_request`` checks, in order, and raises the typed ``EnvelopeError`` of the first failure: size,
legacy fields, protocol version, operation, schema, token (algorithm, kid, signature, issuer, audience,
nbf/iat, jti), claims against the envelope, the lane it came from and the task that runs it, the hashed
claims, the sealed params and their hash, the execution contract. The deadline is not refused there: a worker
looks the ``jti`` up first (a completed one is answered with its stored result even past the deadline), then
calls ``check_deadline``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
import re
import time
import uuid
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeGuard, TypeVar

import jwt
from cryptography.exceptions import InvalidSignature
from jwt.algorithms import HMACAlgorithm
from jwt.exceptions import DecodeError, PyJWTError
from pydantic import BaseModel, ValidationError

from provider.protocol.canonical import (
    CanonicalizationError,
    canonical_json,
    compact_json,
    sha256_hex,
    sha256_hex_bytes,
)
from provider.protocol.envelope import (
    ALLOWED_OPERATIONS,
    ERROR_MESSAGE_TYPE,
    EXECUTION_CONTRACTS,
    IDENT_PATTERN,
    LANE_PATTERN,
    MAX_ERROR_MESSAGE_CHARS,
    MAX_TIMEOUT_S,
    NAME_PATTERN,
    PLAIN_RESPONSE_FIELDS,
    PROTOCOL_VERSION,
    PROVIDER_PATTERN,
    REQUEST_ID_PATTERN,
    REQUEST_MESSAGE_TYPE,
    RESPONSE_MESSAGE_TYPE,
    SEALED_RESPONSE_FIELDS,
    ErrorEnvelope,
    RequestEnvelope,
    ResponseEnvelope,
    check_legacy_fields,
    format_expires_at,
    parse_expires_at,
)
from provider.protocol.errors import (
    PROVIDER_ERROR,
    ClaimMismatchError,
    EncryptionRequiredError,
    EnvelopeError,
    ExpiredError,
    FleetError,
    InvalidSignatureError,
    KeyConfigurationError,
    MalformedError,
    NotYetValidError,
    OperationNotAllowedError,
    PayloadHashMismatchError,
    TokenLifetimeError,
    TooLargeError,
    UnknownKeyError,
    UnsupportedContractError,
    UnsupportedVersionError,
    WrongAudienceError,
    WrongIssuerError,
    as_fleet_error,
    response_forged,
    umbrella_code,
)
from provider.protocol.keys import KeyRing
from provider.protocol.sealing import (
    PURPOSE_PARAMS,
    PURPOSE_RESULT,
    has_one_spelling,
    open_parts,
    open_sealed,
    seal,
)
from provider.protocol.settings import SecuritySettings

__all__ = [
    "DEFAULT_PROVIDER",
    "REPLY_TO_PREFIX",
    "WORKER_SIGNATURE_FIELD",
    "EnvelopeCodec",
    "VerifiedRequest",
]

DEFAULT_PROVIDER = "vllm"
# ``reply_to`` default: the Celery result of the task whose id is the request id.
REPLY_TO_PREFIX = "celery:"
TOKEN_TYPE = "JWT"  # noqa: S105 (the JOSE "typ", not a secret)
# An error message that repeats any run of this many characters of a params string is withheld.
QUOTE_WINDOW_CHARS = 16
QUOTE_STRIDE_CHARS = 8
MIN_QUOTED_LEAF_CHARS = 8
# ``exp`` is a whole second; ``expires_at`` has milliseconds: they agree within this many seconds.
EXP_TOLERANCE_S = 1.0
# NumericDate claims beyond this (about the year 5138) are not times but attacks on float conversion.
MAX_NUMERIC_DATE_S = 1e11

_COMPACT_JWS = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+")
_URLSAFE_TO_STANDARD = bytes.maketrans(b"-_", b"+/")
_B64URL_INDEX = {
    char: index for index, char in enumerate(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
}
_SAFE_FIELD = re.compile(r"[A-Za-z_][A-Za-z0-9_.\[\]]{0,127}")
_ERROR_CODE = re.compile(r"[a-z][a-z0-9_.]{0,63}")
_STRING_CLAIMS = (
    "request_id",
    "correlation_id",
    "idempotency_key",
    "operation",
    "provider",
    "provider_instance",
    "reply_to",
    "expires_at",
)
_OPTIONAL_STRING_CLAIMS = ("model", "execution_contract", "offering_id")
_HASHED_CLAIMS = (
    ("message_context", "message_context_hash"),
    ("caller", "caller_hash"),
    ("trace_context", "trace_context_hash"),
)
_ERROR_ID_PATTERNS = {
    "request_id": REQUEST_ID_PATTERN,
    "correlation_id": IDENT_PATTERN,
    "reply_to": NAME_PATTERN,
    "idempotency_key": IDENT_PATTERN,
    "provider": PROVIDER_PATTERN,
    "provider_instance": NAME_PATTERN,
    "model": NAME_PATTERN,
    "routing_key": LANE_PATTERN,
}
_EMPTY_OBJECT_HASH = sha256_hex({})
# Sealed with a response's payload: the caller's contexts may hold secrets (bearer tokens, user ids).
SEALED_CONTEXT_FIELDS = ("message_context", "trace_context")
# A worker's signature over an answer covers this prefix and the RFC 8785 form of the envelope without it.
WORKER_SIGNATURE_FIELD = "worker_signature"
_ANSWER_SIGNATURE_PREFIX = b"llm.fleet.answer.v2\n"
_ED25519_SIGNATURE_CHARS = 86
_DECODER = json.JSONDecoder()
# The size check bounds an envelope from string lengths; it serializes only when the bound is over the limit.
MAX_JSON_BYTES_PER_CHAR = 6
_MAX_PREPARED_SECRETS = 64
_SIG_OPTIONS: Any = {"verify_signature": True, "enforce_minimum_key_length": True}
_Model = TypeVar("_Model", bound=BaseModel)


class _StrictJWS(jwt.PyJWS):
    """PyJWS whose segment decoder makes the same checks (alphabet, one spelling) faster; no padding."""

    @staticmethod
    def _decode_base64url_segment(segment: bytes, name: str) -> bytes:
        if (
            b"+" in segment
            or b"/" in segment
            or b"=" in segment
            or len(segment) % 4 == 1
            or not has_one_spelling(segment, _B64URL_INDEX)
        ):
            raise DecodeError(f"Invalid {name} padding")
        padded = segment.translate(_URLSAFE_TO_STANDARD) + b"=" * (-len(segment) % 4)
        try:
            return binascii.a2b_base64(padded, strict_mode=True)
        except binascii.Error:
            raise DecodeError(f"Invalid {name} padding") from None


class _CheckedOnceHMAC(HMACAlgorithm):
    """PyJWT's HMAC, running its key-confusion checks (PEM, SSH, DER, JWK) once per secret, not per token."""

    def __init__(self, hash_alg: Any) -> None:
        super().__init__(hash_alg)
        self._prepared: dict[bytes, bytes] = {}

    def prepare_key(self, key: str | bytes) -> bytes:
        raw = key if isinstance(key, bytes) else key.encode("utf-8")
        prepared = self._prepared.get(raw)
        if prepared is None:
            prepared = super().prepare_key(key)
            if len(self._prepared) < _MAX_PREPARED_SECRETS:
                self._prepared[raw] = prepared
        return prepared


_JWS = _StrictJWS()
_JWS.unregister_algorithm("HS256")
_JWS.register_algorithm("HS256", _CheckedOnceHMAC(HMACAlgorithm.SHA256))


def _reject_constant(name: str) -> None:
    raise MalformedError("the envelope is not JSON (NaN or Infinity)")


def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object, refusing duplicate keys (parsers disagree on which one wins)."""
    result = dict(pairs)
    if len(result) != len(pairs):
        raise MalformedError("the envelope has a duplicate key")
    return result


def _loads(text: str | bytes, what: str) -> Any:
    """Strict JSON: no duplicate keys, no NaN/Infinity; MalformedError otherwise."""
    try:
        return json.loads(text, object_pairs_hook=_unique_pairs, parse_constant=_reject_constant)
    except (ValueError, RecursionError):
        raise MalformedError(f"the {what} is not valid JSON") from None


def _loads_signed(data: bytes, what: str) -> Any:
    """JSON that is authenticated already (token claims, opened sealed parts): the plain C decoder."""
    try:
        return _DECODER.decode(data.decode("utf-8"))
    except (ValueError, RecursionError):
        raise MalformedError(f"the {what} is not valid JSON") from None


def _json_size(value: object) -> int:
    """Bytes of the compact UTF-8 JSON of a value."""
    text = compact_json(value)
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def _json_size_bound(envelope: Mapping[Any, Any]) -> int:
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
                    bound += _json_size(inner)
        else:
            bound += _json_size(item)
    return bound


def _is_number(value: object) -> TypeGuard[int | float]:
    return type(value) is int or (type(value) is float and math.isfinite(value))


def _normalize(value: Mapping[str, Any] | None, what: str) -> dict[str, Any]:
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


def _object_hash(value: Mapping[str, Any]) -> str:
    """The hashed-claim value of a JSON object."""
    if not value:
        return _EMPTY_OBJECT_HASH
    try:
        return sha256_hex(value)
    except CanonicalizationError:
        raise MalformedError("a hashed field has no canonical JSON form") from None


def _describe(exc: ValidationError) -> tuple[str, str | None]:
    """A message naming the refused fields (never their values), and the first of them."""
    names: list[str] = []
    for error in exc.errors(include_input=False, include_url=False):
        loc = error.get("loc") or ()
        head = str(loc[0]) if loc else ""
        if not loc and error.get("type") == "value_error":
            name = str(error.get("msg", "")).removeprefix("Value error, ")  # our own validators' words
        else:
            name = head if _SAFE_FIELD.fullmatch(head) else "(field)"
        if name not in names:
            names.append(name)
    if not names:
        return "the envelope does not match the schema", None
    first = names[0] if _SAFE_FIELD.fullmatch(names[0]) else None
    return f"invalid or missing fields: {', '.join(names[:8])}", first


def _string_leaves(value: object, out: list[str], depth: int = 0) -> list[str]:
    """Every string in a JSON value (keys included), for the error-message scrub."""
    if depth > 64:
        return out
    if isinstance(value, str):
        out.append(value)
    elif isinstance(value, dict):
        for key, item in value.items():
            out.append(str(key))
            _string_leaves(item, out, depth + 1)
    elif isinstance(value, list):
        for item in value:
            _string_leaves(item, out, depth + 1)
    return out


def _caller_content(payload: object) -> list[str]:
    """The strings of the caller's own content in params: message texts, tool-call arguments, embedding inputs
    and prompts. Field names and parameter values (temperature, max_tokens, logprobs, response_format, tool
    schemas) are not content: vLLM's explanation of a bad parameter quotes those and must reach the caller."""
    if not isinstance(payload, dict):
        return _string_leaves(payload, [])
    out: list[str] = []
    messages = payload.get("messages")
    if isinstance(messages, list):
        for message in messages:
            if not isinstance(message, dict):
                _string_leaves(message, out)
                continue
            content = message.get("content")
            if isinstance(content, list):
                for part in content:
                    values = part.values() if isinstance(part, dict) else [part]
                    for value in values:
                        _string_leaves(value, out)
            else:
                _string_leaves(content, out)
            for call in message.get("tool_calls") or []:
                function = call.get("function") if isinstance(call, dict) else None
                if isinstance(function, dict):
                    _string_leaves(function.get("arguments"), out)
    else:
        _string_leaves(messages, out)
    for name in ("input", "prompt"):
        _string_leaves(payload.get(name), out)
    return out


def _quotes_payload(message: str, payload: object) -> bool:
    """Whether the message repeats a content string (``_caller_content``) of 8+ characters, or any run of 23+
    characters of one."""
    if payload is None:
        return False
    windows = {message[i : i + QUOTE_WINDOW_CHARS] for i in range(len(message) - QUOTE_WINDOW_CHARS + 1)}
    for leaf in _caller_content(payload):
        if len(leaf) < QUOTE_WINDOW_CHARS:
            if len(leaf) >= MIN_QUOTED_LEAF_CHARS and leaf in message:
                return True
            continue
        for start in range(0, len(leaf) - QUOTE_WINDOW_CHARS + 1, QUOTE_STRIDE_CHARS):
            if leaf[start : start + QUOTE_WINDOW_CHARS] in windows:
                return True
    return False


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
    execution_contract: str | None
    offering_id: str | None
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


class EnvelopeCodec:
    """Signs, seals, verifies and answers envelopes with one ``SecuritySettings`` and its ``KeyRing``."""

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
        return f"EnvelopeCodec(algorithm={self._algorithm!r}, encrypt={self._encrypt!r}, keyring={self._keys!r})"

    # ----------------------------------------------------------------------------------------------- producer

    def build_request(
        self,
        *,
        operation: str,
        task_name: str,
        lane: str,
        params: Mapping[str, Any],
        timeout_s: float,
        model: str | None = None,
        provider_instance: str = "any",
        provider: str = DEFAULT_PROVIDER,
        reply_to: str | None = None,
        request_id: str | None = None,
        correlation_id: str | None = None,
        idempotency_key: str | None = None,
        message_context: Mapping[str, Any] | None = None,
        caller: Mapping[str, Any] | None = None,
        trace_context: Mapping[str, Any] | None = None,
        execution_contract: str | None = None,
        offering_id: str | None = None,
        now: float | None = None,
    ) -> dict[str, Any]:
        """A signed (and, when encryption is on, sealed) request envelope, ready for JSON."""
        if operation not in ALLOWED_OPERATIONS:
            raise OperationNotAllowedError("operation not allowed", field="operation")
        if execution_contract is not None and execution_contract not in EXECUTION_CONTRACTS:
            raise UnsupportedContractError(field="execution_contract")
        if (execution_contract is None) != (offering_id is None):
            raise MalformedError("execution_contract and offering_id go together", field="offering_id")
        if not (_is_number(timeout_s) and timeout_s > 0):
            raise MalformedError("timeout_s must be a positive number of seconds", field="timeout_seconds")
        if timeout_s > self._max_lifetime_s:
            raise TokenLifetimeError(
                f"timeout_s is over this fleet's maximum of {self._max_lifetime_s:g} s", field="timeout_seconds"
            )
        now_s = time.time() if now is None else now
        rid = request_id or uuid.uuid4().hex
        cid = correlation_id or rid
        ikey = idempotency_key or rid
        reply = reply_to or f"{REPLY_TO_PREFIX}{rid}"
        context = _normalize(message_context, "message_context")
        caller_obj = _normalize(caller, "caller")
        trace = _normalize(trace_context, "trace_context")
        try:
            plaintext = canonical_json(dict(params))
        except (CanonicalizationError, TypeError, ValueError):
            raise MalformedError("params are not a JSON object", field="params") from None
        timeout_seconds = float(timeout_s)
        expires_at = format_expires_at(now_s + timeout_seconds)
        claims: dict[str, Any] = {
            "iss": self._security.issuer,
            "aud": self._security.audience,
            "iat": int(now_s),
            "nbf": int(now_s),
            "exp": math.ceil(parse_expires_at(expires_at)),
            "jti": rid,
            "lane": lane,
            "task": task_name,
            "protocol_version": PROTOCOL_VERSION,
            "request_id": rid,
            "correlation_id": cid,
            "idempotency_key": ikey,
            "operation": operation,
            "provider": provider,
            "provider_instance": provider_instance,
            "reply_to": reply,
            "timeout_seconds": timeout_seconds,
            "expires_at": expires_at,
            "message_context_hash": _object_hash(context),
            "params_hash": sha256_hex_bytes(plaintext),
            "caller_hash": _object_hash(caller_obj),
            "trace_context_hash": _object_hash(trace),
        }
        for name, value in (
            ("model", model),
            ("execution_contract", execution_contract),
            ("offering_id", offering_id),
        ):
            if value is not None:
                claims[name] = value
        envelope: dict[str, Any] = {
            "message_type": REQUEST_MESSAGE_TYPE,
            "protocol_version": PROTOCOL_VERSION,
            "request_id": rid,
            "correlation_id": cid,
            "idempotency_key": ikey,
            "operation": operation,
            "provider": provider,
            "provider_instance": provider_instance,
            "model": model,
            "reply_to": reply,
            "message_context": context,
            "caller": caller_obj,
            "trace_context": trace,
            "timeout_seconds": timeout_seconds,
            "expires_at": expires_at,
            "routing_key": lane,
            "execution_contract": execution_contract,
            "offering_id": offering_id,
        }
        if self._encrypt:
            envelope["sealed_params"] = seal(self._keys, plaintext, purpose=PURPOSE_PARAMS, request_id=rid, lane=lane)
        else:
            envelope["params"] = json.loads(plaintext)
        envelope["signed_token"] = self._sign(claims)
        envelope = {name: value for name, value in envelope.items() if value is not None}
        self._validate(RequestEnvelope, envelope)
        return envelope

    def _sign(self, claims: Mapping[str, Any]) -> str:
        """A compact JWS over the claims with the configured algorithm and signing kid."""
        payload = json.dumps(claims, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        return _JWS.encode(
            payload,
            self._keys.signing_key(),
            algorithm=self._algorithm,
            headers={"kid": self._keys.signing_kid, "typ": TOKEN_TYPE},
        )

    def open_response(
        self, envelope: object, *, request_id: str, lane: str | None = None, operation: str | None = None
    ) -> dict[str, Any]:
        """The plain response a fleet worker signed for this request (and, when known, this lane and operation).

        Raises ``FleetError``: the worker's typed error for an error envelope, ``response_forged`` for anything
        no configured worker key signed or that answers another request, lane or operation, and the refusal's
        own code for an authentic answer this side cannot open.
        """
        try:
            return self._open_response(envelope, request_id=request_id, lane=lane, operation=operation)
        except FleetError:
            raise
        except EnvelopeError as exc:
            raise as_fleet_error(exc) from None

    def _open_response(
        self, envelope: object, *, request_id: str, lane: str | None, operation: str | None
    ) -> dict[str, Any]:
        if not self._keys.response_verify_kids:
            raise KeyConfigurationError("no worker response keys are configured here (response_verify_keys)")
        try:
            data = self._load(envelope)
        except EnvelopeError:
            raise response_forged() from None
        if not self.answer_is_authentic(data):
            raise response_forged()
        return self._read_answer(data, request_id=request_id, lane=lane, operation=operation)

    def _read_answer(
        self, data: dict[str, Any], *, request_id: str, lane: str | None, operation: str | None
    ) -> dict[str, Any]:
        """An answer's content once its signature is checked: bound to this request, opened, validated."""
        if data.get("request_id") != request_id:
            raise response_forged("the answer was signed for another request")
        for name, expected in (("routing_key", lane), ("operation", operation)):
            signed = data.get(name)
            if expected is not None and signed is not None and signed != expected:
                raise response_forged(f"the answer was signed for another {name.replace('_', ' ')}")
        check_legacy_fields(data)
        message_type = data.get("message_type")
        if message_type == ERROR_MESSAGE_TYPE:
            error = self._validate(ErrorEnvelope, data)
            raise FleetError(
                error.message,
                code=error.code,
                retryable=error.retryable,
                error_class=error.error_class,
                request_id=error.request_id,
                metadata=error.metadata,
            )
        if message_type != RESPONSE_MESSAGE_TYPE:
            raise MalformedError("not a response or error envelope", field="message_type")
        response = self._validate(ResponseEnvelope, data)
        if response.routing_key is None or response.operation is None:
            raise response_forged("the response names no lane or operation")
        plain = {
            name: value
            for name, value in data.items()
            if name not in ("sealed_body", WORKER_SIGNATURE_FIELD) and value is not None
        }
        if response.sealed_body is None:
            if self._encrypt and any(name in plain for name in (*SEALED_RESPONSE_FIELDS, *SEALED_CONTEXT_FIELDS)):
                raise EncryptionRequiredError("the response payload must be sealed", field="sealed_body")
            return plain
        plaintext = open_sealed(
            self._keys,
            response.sealed_body,
            purpose=PURPOSE_RESULT,
            request_id=request_id,
            lane=response.routing_key or "",
        )
        body = _loads_signed(plaintext, "sealed response body")
        if not isinstance(body, dict) or not set(body) <= {*SEALED_RESPONSE_FIELDS, *SEALED_CONTEXT_FIELDS}:
            raise MalformedError("the sealed response body has unexpected fields", field="sealed_body")
        merged = {**plain, **{name: value for name, value in body.items() if value is not None}}
        self._validate(ResponseEnvelope, merged)
        return merged

    # ------------------------------------------------------------------------------------------------- worker

    def verify_request(
        self,
        raw: object,
        *,
        lane: str | None,
        task_name: str,
        now: float | None = None,
        operations: Collection[str] | None = None,
        enforce_deadline: bool = False,
    ) -> VerifiedRequest:
        """Every check but the deadline (``check_deadline``); the typed EnvelopeError of the first failure."""
        now_s = time.time() if now is None else now
        data = self._load(raw)
        check_legacy_fields(data)
        version = data.get("protocol_version", PROTOCOL_VERSION)
        if type(version) is not int or version != PROTOCOL_VERSION:
            raise UnsupportedVersionError("protocol_version must be 2", field="protocol_version")
        operation = data.get("operation")
        if isinstance(operation, str) and operation not in ALLOWED_OPERATIONS:
            raise OperationNotAllowedError("operation not allowed", field="operation")
        env = self._validate(RequestEnvelope, data)
        claims, digest = self._verify_token(env.signed_token, now_s)
        self._match_claims(claims, env, lane, task_name)
        for name, claim in _HASHED_CLAIMS:
            signed = claims.get(claim)
            if type(signed) is not str or signed != _object_hash(getattr(env, name)):
                raise ClaimMismatchError(f"{name} does not match its signed hash", field=name)
        params, params_hash = self._params(env, claims)
        if env.execution_contract is not None:
            if env.execution_contract not in EXECUTION_CONTRACTS:
                raise UnsupportedContractError(field="execution_contract")
            if env.offering_id is None or env.provider_instance == "any":
                raise MalformedError("an exact-offering request names its offering and instance", field="offering_id")
        elif env.offering_id is not None:
            raise MalformedError("offering_id needs an execution contract", field="offering_id")
        if operations is not None and env.operation not in operations:
            raise OperationNotAllowedError("operation not allowed for this task", field="operation")
        expires_epoch = parse_expires_at(env.expires_at)
        if abs(claims["exp"] - expires_epoch) > EXP_TOLERANCE_S:
            raise ClaimMismatchError("exp does not match expires_at", field="exp")
        self._check_lifetime(claims, env.timeout_seconds)
        verified = VerifiedRequest(
            request_id=env.request_id,
            correlation_id=env.correlation_id,
            idempotency_key=env.idempotency_key,
            operation=env.operation,
            provider=env.provider,
            provider_instance=env.provider_instance,
            model=env.model,
            lane=env.routing_key,
            task_name=task_name,
            reply_to=env.reply_to,
            params=params,
            timeout_seconds=env.timeout_seconds,
            expires_at=env.expires_at,
            expires_at_epoch=expires_epoch,
            issued_at_epoch=float(claims["iat"]),
            caller=env.caller,
            message_context=env.message_context,
            trace_context=env.trace_context,
            execution_contract=env.execution_contract,
            offering_id=env.offering_id,
            token_digest=digest,
            params_hash=params_hash,
            caller_hash=claims["caller_hash"],
            sealed=env.sealed_params is not None,
            claims=claims,
        )
        if enforce_deadline:
            self.check_deadline(verified, now=now_s)
        return verified

    def check_deadline(self, verified: VerifiedRequest, now: float | None = None) -> None:
        """ExpiredError when the deadline (plus leeway) has passed."""
        now_s = time.time() if now is None else now
        if now_s > verified.expires_at_epoch + self._leeway_s:
            raise ExpiredError(field="expires_at")

    def response(
        self, verified: VerifiedRequest, body: Mapping[str, Any], *, include_reasoning: bool | None = None
    ) -> dict[str, Any]:
        """A response envelope signed by this worker, its payload sealed when encryption is on; reasoning only
        when asked for."""
        return self.sign_answer(self._unsigned_response(verified, body, include_reasoning))

    def _unsigned_response(
        self, verified: VerifiedRequest, body: Mapping[str, Any], include_reasoning: bool | None
    ) -> dict[str, Any]:
        unknown = set(body) - set(SEALED_RESPONSE_FIELDS) - set(PLAIN_RESPONSE_FIELDS)
        if unknown:
            raise MalformedError("the response body has unexpected fields", field="body")
        if include_reasoning is None:
            include_reasoning = verified.params.get("include_reasoning") is True
        payload = {name: body[name] for name in SEALED_RESPONSE_FIELDS if body.get(name) is not None}
        if not include_reasoning:
            payload.pop("reasoning", None)
        # The caller's contexts come back sealed with the payload (never in clear at rest when encryption is on).
        for name in SEALED_CONTEXT_FIELDS:
            context = getattr(verified, name)
            if context:
                payload[name] = context
        envelope: dict[str, Any] = {
            "message_type": RESPONSE_MESSAGE_TYPE,
            "protocol_version": PROTOCOL_VERSION,
            **self._ids(verified),
            "usage": body.get("usage"),
            "finish_reason": body.get("finish_reason"),
        }
        envelope = {name: value for name, value in envelope.items() if value is not None}
        self._validate(ResponseEnvelope, {**envelope, **payload})
        if not self._encrypt:
            return {**envelope, **payload}
        try:
            plaintext = canonical_json(payload)
        except CanonicalizationError:
            raise MalformedError("the response body is not JSON", field="body") from None
        envelope["sealed_body"] = seal(
            self._keys, plaintext, purpose=PURPOSE_RESULT, request_id=verified.request_id, lane=verified.lane
        )
        return envelope

    def error(self, source: VerifiedRequest | Mapping[str, Any] | None, exc: BaseException) -> dict[str, Any]:
        """An error envelope, with the ids when known; its message never quotes the params."""
        code = getattr(exc, "code", None)
        typed = isinstance(code, str) and _ERROR_CODE.fullmatch(code) is not None
        if not typed or not isinstance(code, str):
            code = PROVIDER_ERROR
        raw_message = getattr(exc, "message", None)
        if not isinstance(raw_message, str):
            raw_message = str(exc) if typed else f"the worker failed ({type(exc).__name__})"
        message = raw_message[:MAX_ERROR_MESSAGE_CHARS]
        payload: object = None
        ids: dict[str, Any] = {}
        if isinstance(source, VerifiedRequest):
            ids = self._ids(source)
            payload = source.params
        elif isinstance(source, Mapping):
            ids = self._unverified_ids(source)
            payload = source.get("params")
        if _quotes_payload(message, payload):
            message = f"{code}: the message was withheld because it quoted the request"
        metadata: dict[str, Any] = {}
        failed_field = getattr(exc, "field", None)
        if isinstance(failed_field, str) and _SAFE_FIELD.fullmatch(failed_field):
            metadata["field"] = failed_field
        instance = getattr(exc, "instance", None)
        if isinstance(instance, str) and NAME_PATTERN.fullmatch(instance):
            metadata["instance"] = instance
        status = getattr(exc, "status_code", None)
        if type(status) is int:
            metadata["status_code"] = status
        envelope: dict[str, Any] = {
            "message_type": ERROR_MESSAGE_TYPE,
            "protocol_version": PROTOCOL_VERSION,
            "code": code,
            "category": umbrella_code(code),
            "message": message,
            "error_class": type(exc).__name__[:128],
            "retryable": getattr(exc, "retryable", False) is True,
            "metadata": metadata or None,
            **ids,
        }
        envelope = {name: value for name, value in envelope.items() if value is not None}
        self._validate(ErrorEnvelope, envelope)
        return self.sign_answer(envelope)

    def sign_answer(self, envelope: dict[str, Any]) -> dict[str, Any]:
        """The envelope with this worker's Ed25519 signature over all of it (``worker_signature``)."""
        unsigned = {name: value for name, value in envelope.items() if name != WORKER_SIGNATURE_FIELD}
        try:
            signing_input = _ANSWER_SIGNATURE_PREFIX + canonical_json(unsigned)
        except CanonicalizationError:
            raise MalformedError("the answer has no canonical JSON form", field="body") from None
        signature = self._keys.response_signing_key().sign(signing_input)
        unsigned[WORKER_SIGNATURE_FIELD] = {
            "kid": self._keys.response_signing_kid,
            "sig": base64.urlsafe_b64encode(signature).rstrip(b"=").decode("ascii"),
        }
        return unsigned

    def answer_is_authentic(self, data: Mapping[str, Any]) -> bool:
        """Whether a worker whose public key is configured here signed exactly this envelope."""
        signature = data.get(WORKER_SIGNATURE_FIELD)
        if not isinstance(signature, dict) or set(signature) != {"kid", "sig"}:
            return False
        kid, sig = signature["kid"], signature["sig"]
        if not isinstance(kid, str) or not isinstance(sig, str) or len(sig) != _ED25519_SIGNATURE_CHARS:
            return False
        public = self._keys.response_verify_key(kid)
        if public is None:
            return False
        try:
            raw = _StrictJWS._decode_base64url_segment(sig.encode("ascii"), "signature")
            signing_input = _ANSWER_SIGNATURE_PREFIX + canonical_json(
                {name: value for name, value in data.items() if name != WORKER_SIGNATURE_FIELD}
            )
            public.verify(raw, signing_input)
        except (DecodeError, UnicodeEncodeError, CanonicalizationError, TypeError, ValueError, InvalidSignature):
            return False
        return True

    # ---------------------------------------------------------------------------------------------- internals

    def _load(self, raw: object) -> dict[str, Any]:
        """The envelope as a dict, within the size limit; TooLargeError or MalformedError otherwise."""
        if isinstance(raw, bytes | bytearray | memoryview):
            data_bytes = bytes(raw)
            if len(data_bytes) > self._max_bytes:
                raise TooLargeError(field="envelope")
            try:
                loaded = _loads(data_bytes.decode("utf-8"), "envelope")
            except UnicodeDecodeError:
                raise MalformedError("the envelope is not UTF-8") from None
        elif isinstance(raw, str):
            if len(raw) > self._max_bytes or len(raw.encode("utf-8", "surrogatepass")) > self._max_bytes:
                raise TooLargeError(field="envelope")
            loaded = _loads(raw, "envelope")
        elif isinstance(raw, dict):
            try:
                too_large = _json_size_bound(raw) > self._max_bytes and _json_size(raw) > self._max_bytes
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
            message, first = _describe(exc)
            raise MalformedError(message, field=first) from None

    def _verify_token(self, token: str, now_s: float) -> tuple[dict[str, Any], str]:
        """The verified claims and the digest that names this message (SHA-256 of the signing input)."""
        if _COMPACT_JWS.fullmatch(token) is None:
            raise InvalidSignatureError("the token is not a compact JWS", field="signed_token")
        header_b64, payload_b64, _ = token.split(".")
        try:
            header = json.loads(_StrictJWS._decode_base64url_segment(header_b64.encode("ascii"), "header"))
        except (DecodeError, ValueError, RecursionError):
            raise InvalidSignatureError("the token header is not valid", field="signed_token") from None
        if not isinstance(header, dict):
            raise InvalidSignatureError("the token header is not valid", field="signed_token")
        if header.get("alg") != self._algorithm:
            raise InvalidSignatureError("the token algorithm is not the configured one", field="alg")
        if header.get("typ", TOKEN_TYPE) != TOKEN_TYPE:
            raise InvalidSignatureError("the token type is not JWT", field="typ")
        kid = header.get("kid")
        if not isinstance(kid, str):
            raise UnknownKeyError("the token names no key id", field="kid")
        key = self._keys.verify_key(kid)
        try:
            decoded = _JWS.decode_complete(token, key=key, algorithms=self._algorithms, options=_SIG_OPTIONS)
        except jwt.InvalidSignatureError:
            raise InvalidSignatureError("the token signature does not verify", field="signed_token") from None
        except (PyJWTError, ValueError, TypeError):
            raise InvalidSignatureError("the token could not be verified", field="signed_token") from None
        claims = _loads(decoded["payload"], "token payload")  # strict: a duplicate claim is refused
        if not isinstance(claims, dict):
            raise MalformedError("the token claims are not a JSON object", field="signed_token")
        issuer = claims.get("iss")
        if not isinstance(issuer, str) or issuer not in self._issuers:
            raise WrongIssuerError(field="iss")
        audience = claims.get("aud")
        wanted = self._security.audience
        if audience != wanted and not (
            isinstance(audience, list) and wanted in audience and all(isinstance(a, str) for a in audience)
        ):
            raise WrongAudienceError(field="aud")
        for name in ("iat", "nbf", "exp"):
            value = claims.get(name)
            if not _is_number(value) or not -MAX_NUMERIC_DATE_S < value < MAX_NUMERIC_DATE_S:
                raise MalformedError(f"token claim {name!r} is missing or not a time", field=name)
        if claims["nbf"] > now_s + self._leeway_s:
            raise NotYetValidError("the token is not valid yet (nbf)", field="nbf")
        if claims["iat"] > now_s + self._leeway_s:
            raise NotYetValidError("the token was issued in the future (iat)", field="iat")
        jti = claims.get("jti")
        if not isinstance(jti, str) or not jti:
            raise MalformedError("token claim 'jti' is missing", field="jti")
        digest = hashlib.sha256(f"{header_b64}.{payload_b64}".encode("ascii")).hexdigest()
        return claims, digest

    def _check_lifetime(self, claims: Mapping[str, Any], timeout_s: float) -> None:
        """A token lives at most its own timeout (plus leeway), and its timeout is within the fleet's maximum.

        Without this a token signed for ten years would be served for ten years, and its jti record (the replay
        guard) would have to live as long."""
        lifetime_s = claims["exp"] - claims["iat"]
        if lifetime_s > timeout_s + self._leeway_s + EXP_TOLERANCE_S:
            raise TokenLifetimeError("the token outlives its own timeout", field="exp")
        if timeout_s > self._max_lifetime_s:
            raise TokenLifetimeError("the timeout is over this fleet's maximum", field="timeout_seconds")

    def _match_claims(self, claims: Mapping[str, Any], env: RequestEnvelope, lane: str | None, task_name: str) -> None:
        """Every scalar claim equals its envelope field; the lane claim the routing key and the queue."""
        if claims.get("jti") != env.request_id:
            raise ClaimMismatchError("claim 'jti' does not match the request id", field="jti")
        for name in _STRING_CLAIMS:
            signed = claims.get(name)
            if type(signed) is not str or signed != getattr(env, name):
                raise ClaimMismatchError(f"claim {name!r} does not match the envelope", field=name)
        for name in _OPTIONAL_STRING_CLAIMS:
            signed, value = claims.get(name), getattr(env, name)
            if (signed is not None or value is not None) and (type(signed) is not str or signed != value):
                raise ClaimMismatchError(f"claim {name!r} does not match the envelope", field=name)
        timeout = claims.get("timeout_seconds")
        if not _is_number(timeout) or timeout != env.timeout_seconds:
            raise ClaimMismatchError("claim 'timeout_seconds' does not match the envelope", field="timeout_seconds")
        version = claims.get("protocol_version", PROTOCOL_VERSION)
        if type(version) is not int or version != PROTOCOL_VERSION:
            raise ClaimMismatchError("claim 'protocol_version' does not match", field="protocol_version")
        signed_lane = claims.get("lane")
        if type(signed_lane) is not str or signed_lane != env.routing_key:
            raise ClaimMismatchError("claim 'lane' does not match the routing key", field="lane")
        if lane is not None and lane != signed_lane:
            raise ClaimMismatchError("the message arrived on another lane than it was signed for", field="lane")
        task = claims.get("task")
        if type(task) is not str or task != task_name:
            raise ClaimMismatchError("claim 'task' does not match the task", field="task")

    def _params(self, env: RequestEnvelope, claims: Mapping[str, Any]) -> tuple[dict[str, Any], str]:
        """The plaintext params and their hash, checked against the signed ``params_hash``."""
        signed = claims.get("params_hash")
        box = env.sealed_params
        if box is not None:
            plaintext = open_parts(
                self._keys,
                box.kid,
                box.nonce,
                box.ciphertext,
                purpose=PURPOSE_PARAMS,
                request_id=env.request_id,
                lane=env.routing_key,
            )
            params_hash = sha256_hex_bytes(plaintext)
            if type(signed) is not str or signed != params_hash:
                raise PayloadHashMismatchError(field="params")
            params = _loads_signed(plaintext, "sealed params")
            if not isinstance(params, dict):
                raise MalformedError("the sealed params are not a JSON object", field="params")
            check_legacy_fields(params, where="params")
            return params, params_hash
        if self._encrypt:
            raise EncryptionRequiredError(field="params")
        assert env.params is not None
        params_hash = _object_hash(env.params)
        if type(signed) is not str or signed != params_hash:
            raise PayloadHashMismatchError(field="params")
        return env.params, params_hash

    @staticmethod
    def _ids(verified: VerifiedRequest) -> dict[str, Any]:
        """The ids a response or error envelope repeats from its request."""
        ids: dict[str, Any] = {
            "request_id": verified.request_id,
            "correlation_id": verified.correlation_id,
            "reply_to": verified.reply_to,
            "idempotency_key": verified.idempotency_key,
            "operation": verified.operation,
            "provider": verified.provider,
            "provider_instance": verified.provider_instance,
            "model": verified.model,
            "routing_key": verified.lane,
        }
        return {name: value for name, value in ids.items() if value is not None}

    @staticmethod
    def _unverified_ids(raw: Mapping[str, Any]) -> dict[str, Any]:
        """Ids from an envelope that failed verification: only well-formed ones, never contexts or payload."""
        ids: dict[str, Any] = {}
        for name, pattern in _ERROR_ID_PATTERNS.items():
            value = raw.get(name)
            if isinstance(value, str) and pattern.fullmatch(value):
                ids[name] = value
        operation = raw.get("operation")
        if isinstance(operation, str) and operation in ALLOWED_OPERATIONS:
            ids["operation"] = operation
        return ids
