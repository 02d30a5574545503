"""The one module that touches PyJWT: compact JWS signing and checking for request tokens.

``StrictJWS`` overrides PyJWS's private ``_decode_base64url_segment`` (same checks, faster), so PyJWT is pinned
to one minor series in ``pyproject.toml``; ``tests/protocol/test_jws_decoder.py`` compares both decoders.
"""

from __future__ import annotations

import binascii
import json
from collections.abc import Mapping, Sequence
from typing import Any

import jwt
from jwt.algorithms import HMACAlgorithm
from jwt.exceptions import DecodeError, PyJWTError

from provider.protocol.errors import InvalidSignatureError
from provider.protocol.sealing import has_one_spelling

__all__ = ["TOKEN_TYPE", "StrictJWS", "decode_segment", "sign_token", "verify_token_signature"]

TOKEN_TYPE = "JWT"  # noqa: S105 (the JOSE "typ", not a secret)
_URLSAFE_TO_STANDARD = bytes.maketrans(b"-_", b"+/")
_B64URL_INDEX = {
    char: index for index, char in enumerate(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
}
_MAX_PREPARED_SECRETS = 64
_SIG_OPTIONS: Any = {"verify_signature": True, "enforce_minimum_key_length": True}


class StrictJWS(jwt.PyJWS):
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


_JWS = StrictJWS()
_JWS.unregister_algorithm("HS256")
_JWS.register_algorithm("HS256", _CheckedOnceHMAC(HMACAlgorithm.SHA256))


def decode_segment(segment: bytes, name: str) -> bytes | None:
    """A base64url segment (no padding, one spelling) decoded, or None when it is not one."""
    try:
        return StrictJWS._decode_base64url_segment(segment, name)
    except DecodeError:
        return None


def sign_token(claims: Mapping[str, Any], key: Any, *, algorithm: str, kid: str) -> str:
    """A compact JWS over the claims (JSON, non-ASCII kept) with this key and kid."""
    payload = json.dumps(claims, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    return _JWS.encode(payload, key, algorithm=algorithm, headers={"kid": kid, "typ": TOKEN_TYPE})


def verify_token_signature(token: str, key: Any, algorithms: Sequence[str]) -> bytes:
    """The token's payload bytes once its signature verifies; InvalidSignatureError otherwise."""
    try:
        decoded = _JWS.decode_complete(token, key=key, algorithms=list(algorithms), options=_SIG_OPTIONS)
    except jwt.InvalidSignatureError:
        raise InvalidSignatureError("the token signature does not verify", field="signed_token") from None
    except (PyJWTError, ValueError, TypeError):
        raise InvalidSignatureError("the token could not be verified", field="signed_token") from None
    payload: bytes = decoded["payload"]
    return payload
