"""The worker's side of an answer: response and error envelopes, sealed and signed with the worker's key."""

from __future__ import annotations

import base64
import re
from collections.abc import Mapping
from typing import Any

from provider.protocol.canonical import (
    CanonicalizationError,
    canonical_json,
)
from provider.protocol.envelope import (
    ALLOWED_OPERATIONS,
    ERROR_MESSAGE_TYPE,
    IDENT_PATTERN,
    LANE_PATTERN,
    MAX_ERROR_MESSAGE_CHARS,
    NAME_PATTERN,
    PLAIN_RESPONSE_FIELDS,
    PROTOCOL_VERSION,
    PROVIDER_PATTERN,
    REQUEST_ID_PATTERN,
    RESPONSE_MESSAGE_TYPE,
    SEALED_RESPONSE_FIELDS,
    ErrorEnvelope,
    ResponseEnvelope,
)
from provider.protocol.errors import (
    PROVIDER_ERROR,
    MalformedError,
    umbrella_code,
)
from provider.protocol.sealing import (
    PURPOSE_RESULT,
    seal,
)
from provider.protocol.wire import (
    ANSWER_SIGNATURE_PREFIX,
    SAFE_FIELD,
    SEALED_CONTEXT_FIELDS,
    WORKER_SIGNATURE_FIELD,
    CodecCore,
    VerifiedRequest,
)

# An error message that repeats any run of this many characters of a params string is withheld.
QUOTE_WINDOW_CHARS = 16
QUOTE_STRIDE_CHARS = 8
MIN_QUOTED_LEAF_CHARS = 8
_ERROR_CODE = re.compile(r"[a-z][a-z0-9_.]{0,63}")
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


class AnswerSigner(CodecCore):
    """Builds and signs a worker's response and error envelopes."""

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
        if isinstance(failed_field, str) and SAFE_FIELD.fullmatch(failed_field):
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
            signing_input = ANSWER_SIGNATURE_PREFIX + canonical_json(unsigned)
        except CanonicalizationError:
            raise MalformedError("the answer has no canonical JSON form", field="body") from None
        signature = self._keys.response_signing_key().sign(signing_input)
        unsigned[WORKER_SIGNATURE_FIELD] = {
            "kid": self._keys.response_signing_kid,
            "sig": base64.urlsafe_b64encode(signature).rstrip(b"=").decode("ascii"),
        }
        return unsigned

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
