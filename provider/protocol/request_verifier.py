"""The worker's side of a request: verify the token, the claims and the hashes, and open the sealed params."""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Collection, Mapping
from typing import Any

from provider.protocol.canonical import (
    sha256_hex_bytes,
)
from provider.protocol.envelope import (
    ALLOWED_OPERATIONS,
    EXECUTION_CONTRACTS,
    PROTOCOL_VERSION,
    RequestEnvelope,
    check_legacy_fields,
    parse_expires_at,
)
from provider.protocol.errors import (
    ClaimMismatchError,
    EncryptionRequiredError,
    ExpiredError,
    InvalidSignatureError,
    MalformedError,
    NotYetValidError,
    OperationNotAllowedError,
    PayloadHashMismatchError,
    TokenLifetimeError,
    UnknownKeyError,
    UnsupportedContractError,
    UnsupportedVersionError,
    WrongAudienceError,
    WrongIssuerError,
)
from provider.protocol.jws import TOKEN_TYPE, decode_segment, verify_token_signature
from provider.protocol.sealing import (
    PURPOSE_PARAMS,
    open_parts,
)
from provider.protocol.wire import (
    EXP_TOLERANCE_S,
    MAX_NUMERIC_DATE_S,
    CodecCore,
    VerifiedRequest,
    is_number,
    loads,
    loads_signed,
    object_hash,
)

_COMPACT_JWS = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+")
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


class RequestVerifier(CodecCore):
    """Verifies request envelopes (every check but the deadline, which ``check_deadline`` makes)."""

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
            if type(signed) is not str or signed != object_hash(getattr(env, name)):
                raise ClaimMismatchError(f"{name} does not match its signed hash", field=name)
        params, params_hash = self._params(env, claims)
        if env.execution_contract is not None and env.execution_contract not in EXECUTION_CONTRACTS:
            raise UnsupportedContractError(field="execution_contract")
        if env.offering_id is not None:
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

    def _verify_token(self, token: str, now_s: float) -> tuple[dict[str, Any], str]:
        """The verified claims and the digest that names this message (SHA-256 of the signing input)."""
        if _COMPACT_JWS.fullmatch(token) is None:
            raise InvalidSignatureError("the token is not a compact JWS", field="signed_token")
        header_b64, payload_b64, _ = token.split(".")
        header_bytes = decode_segment(header_b64.encode("ascii"), "header")
        try:
            header = json.loads(header_bytes) if header_bytes is not None else None
        except (ValueError, RecursionError):
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
        payload = verify_token_signature(token, key, self._algorithms)
        claims = loads(payload, "token payload")  # strict: a duplicate claim is refused
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
            if not is_number(value) or not -MAX_NUMERIC_DATE_S < value < MAX_NUMERIC_DATE_S:
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
        if not is_number(timeout) or timeout != env.timeout_seconds:
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
            params = loads_signed(plaintext, "sealed params")
            if not isinstance(params, dict):
                raise MalformedError("the sealed params are not a JSON object", field="params")
            check_legacy_fields(params, where="params")
            return params, params_hash
        if self._encrypt:
            raise EncryptionRequiredError(field="params")
        assert env.params is not None
        params_hash = object_hash(env.params)
        if type(signed) is not str or signed != params_hash:
            raise PayloadHashMismatchError(field="params")
        return env.params, params_hash
