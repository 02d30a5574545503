"""The producer's side of a request: build, seal and sign an envelope."""

from __future__ import annotations

import json
import math
import time
import uuid
from collections.abc import Mapping
from typing import Any

from provider.protocol.canonical import (
    CanonicalizationError,
    canonical_json,
    sha256_hex_bytes,
)
from provider.protocol.envelope import (
    ALLOWED_OPERATIONS,
    PROTOCOL_VERSION,
    REQUEST_MESSAGE_TYPE,
    RequestEnvelope,
    format_expires_at,
    parse_expires_at,
)
from provider.protocol.errors import (
    MalformedError,
    OperationNotAllowedError,
    TokenLifetimeError,
)
from provider.protocol.jws import sign_token
from provider.protocol.sealing import (
    PURPOSE_PARAMS,
    seal,
)
from provider.protocol.wire import (
    DEFAULT_PROVIDER,
    REPLY_TO_PREFIX,
    CodecCore,
    is_number,
    normalize,
    object_hash,
)


class RequestSigner(CodecCore):
    """Builds signed (and, when encryption is on, sealed) request envelopes."""

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
        now: float | None = None,
    ) -> dict[str, Any]:
        """A signed (and, when encryption is on, sealed) request envelope, ready for JSON."""
        if operation not in ALLOWED_OPERATIONS:
            raise OperationNotAllowedError("operation not allowed", field="operation")
        if not (is_number(timeout_s) and timeout_s > 0):
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
        context = normalize(message_context, "message_context")
        caller_obj = normalize(caller, "caller")
        trace = normalize(trace_context, "trace_context")
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
            "message_context_hash": object_hash(context),
            "params_hash": sha256_hex_bytes(plaintext),
            "caller_hash": object_hash(caller_obj),
            "trace_context_hash": object_hash(trace),
        }
        if model is not None:
            claims["model"] = model
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
        return sign_token(claims, self._keys.signing_key(), algorithm=self._algorithm, kid=self._keys.signing_kid)
