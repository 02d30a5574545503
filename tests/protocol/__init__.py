"""Tests of ``provider.protocol``; shared helpers build settings and codecs around keys made once per run."""

from __future__ import annotations

import base64
import copy
import functools
import json
from collections.abc import Mapping
from typing import Any

import jwt
from pydantic import SecretStr

from provider.protocol import EnvelopeCodec, GeneratedKeypair, generate_encryption_key, generate_keypair
from provider.settings import SecuritySettings

LANE = "llm.fleet.inference.qwen3-6-27b.ctx32768"
OTHER_LANE = "llm.fleet.inference.qwen3-6-27b.ctx8192"
TASK = "fleet.chat"
MODEL = "qwen3.6:27b"
NOW = 1_800_000_000.0
TIMEOUT_S = 30.0
# Text that must never show up in an error message, a repr or a token.
SECRET_PROMPT = "the-launch-code-is-swordfish-0451"
PARAMS: dict[str, Any] = {
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": f"Tell me {SECRET_PROMPT} again, in detail please"},
    ],
    "max_tokens": 64,
    "temperature": 0.7,
    "top_p": 1.0,
}
CONTEXT: dict[str, Any] = {"conversation_id": "c-42", "turn": 3}
CALLER: dict[str, Any] = {"app": "tests", "user": "u-1"}
TRACE: dict[str, Any] = {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}

KIND_FOR_ALGORITHM = {"EdDSA": "ed25519", "HS256": "hs256", "RS256": "rs256", "ES256": "es256"}


@functools.cache
def _keypair(algorithm: str, kid: str, variant: int) -> GeneratedKeypair:
    del variant
    return generate_keypair(KIND_FOR_ALGORITHM[algorithm], kid)  # type: ignore[arg-type]


def keypair(algorithm: str, kid: str = "k1", variant: int = 0) -> GeneratedKeypair:
    """A key pair for an algorithm, made once per (algorithm, kid, variant)."""
    return _keypair(algorithm, kid, variant)


@functools.cache
def _aes_key(kid: str, variant: int) -> str:
    del variant
    return generate_encryption_key(kid).key_b64


def aes_key(kid: str = "e1", variant: int = 0) -> str:
    """A base64 AES-256 key, made once per (kid, variant)."""
    return _aes_key(kid, variant)


def producer_settings(
    algorithm: str = "EdDSA",
    *,
    kid: str = "k1",
    variant: int = 0,
    encrypt: bool = True,
    enc_kid: str = "e1",
    enc_variant: int = 0,
    **overrides: Any,
) -> SecuritySettings:
    """Settings of a side that signs (and so also verifies its own kid)."""
    values: dict[str, Any] = {
        "algorithm": algorithm,
        "signing_key": SecretStr(keypair(algorithm, kid, variant).private),
        "signing_kid": kid,
        "encrypt": encrypt,
        "encryption_keys": {enc_kid: SecretStr(aes_key(enc_kid, enc_variant))},
        "encryption_kid": enc_kid,
        # the helpers' codecs play both sides: a worker's response key too (tests of the split build their own)
        "response_signing_key": SecretStr(keypair("EdDSA", "w1").private),
        "response_verify_keys": {"w1": SecretStr(keypair("EdDSA", "w1").public)},
    }
    values.update(overrides)
    return SecuritySettings(**values)


def worker_settings(
    algorithm: str = "EdDSA",
    *,
    kids: Mapping[str, int] | None = None,
    encrypt: bool = True,
    enc_kid: str = "e1",
    enc_variant: int = 0,
    **overrides: Any,
) -> SecuritySettings:
    """Settings of a side that only verifies: public keys (or the shared secret) by kid."""
    kids = {"k1": 0} if kids is None else kids
    values: dict[str, Any] = {
        "algorithm": algorithm,
        "verify_keys": {kid: SecretStr(keypair(algorithm, kid, v).public) for kid, v in kids.items()},
        "encrypt": encrypt,
        "encryption_keys": {enc_kid: SecretStr(aes_key(enc_kid, enc_variant))},
        "encryption_kid": enc_kid,
        "response_signing_key": SecretStr(keypair("EdDSA", "w1").private),
        "response_signing_kid": "w1",
    }
    values.update(overrides)
    return SecuritySettings(**values)


def producer(algorithm: str = "EdDSA", **kwargs: Any) -> EnvelopeCodec:
    """A codec that signs."""
    return EnvelopeCodec(producer_settings(algorithm, **kwargs))


def worker(algorithm: str = "EdDSA", **kwargs: Any) -> EnvelopeCodec:
    """A codec that only verifies."""
    return EnvelopeCodec(worker_settings(algorithm, **kwargs))


def build(codec: EnvelopeCodec, **overrides: Any) -> dict[str, Any]:
    """A chat request envelope built at ``NOW``."""
    values: dict[str, Any] = {
        "operation": "chat",
        "task_name": TASK,
        "lane": LANE,
        "params": PARAMS,
        "timeout_s": TIMEOUT_S,
        "model": MODEL,
        "message_context": CONTEXT,
        "caller": CALLER,
        "trace_context": TRACE,
        "now": NOW,
    }
    values.update(overrides)
    return codec.build_request(**values)


def claims_of(envelope: Mapping[str, Any]) -> dict[str, Any]:
    """The token's claims, unverified (to craft variants)."""
    claims: dict[str, Any] = jwt.decode(envelope["signed_token"], options={"verify_signature": False})
    return claims


def resign(
    envelope: Mapping[str, Any],
    *,
    algorithm: str = "EdDSA",
    kid: str = "k1",
    claims: Mapping[str, Any] | None = None,
    drop_claims: tuple[str, ...] = (),
    fields: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """A copy of an envelope with changed fields and a token re-signed (validly) over changed claims."""
    changed = copy.deepcopy(dict(envelope))
    changed.update(fields or {})
    new_claims = {**claims_of(envelope), **(claims or {})}
    for name in drop_claims:
        new_claims.pop(name, None)
    pair = keypair(algorithm, kid)
    key: Any = pair.private.encode() if algorithm == "HS256" else pair.private
    changed["signed_token"] = jwt.encode(new_claims, key, algorithm=algorithm, headers={"kid": kid})
    return changed


def b64url(data: bytes) -> str:
    """Unpadded base64url."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def raw_token(header: Mapping[str, Any], claims: Mapping[str, Any], signature: bytes) -> str:
    """A compact JWS put together by hand (for attacks PyJWT refuses to produce)."""
    head = b64url(json.dumps(dict(header)).encode())
    body = b64url(json.dumps(dict(claims)).encode())
    return f"{head}.{body}.{b64url(signature)}"
