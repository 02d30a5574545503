"""Registry records a worker signs and every reader checks: ``{"record": {...}, "worker_signature": {kid, sig}}``.

The signature is the worker's Ed25519 response key over a purpose, the record kind (``offering``,
``instance``) and the RFC 8785 form of the record, so a record written by anyone without a worker key, or moved
to another kind, is refused; ``open`` then returns None and the reader skips it.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

from cryptography.exceptions import InvalidSignature

from provider.protocol.canonical import CanonicalizationError, canonical_json
from provider.protocol.keys import KeyRing

__all__ = ["RECORD_FIELD", "RECORD_SIGNATURE_FIELD", "RecordAuthenticator", "unwrap_unverified"]

RECORD_FIELD = "record"
RECORD_SIGNATURE_FIELD = "worker_signature"
_PURPOSE = b"llm.fleet.registry.record.v1"
_ED25519_SIGNATURE_BYTES = 64


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _signing_input(kind: str, record: dict[str, Any]) -> bytes:
    return b"%s\n%s\n%s" % (_PURPOSE, kind.encode("ascii"), canonical_json(record))


def _parse(raw: bytes | str) -> dict[str, Any] | None:
    try:
        wrapper = json.loads(raw)
    except (ValueError, RecursionError, UnicodeDecodeError):
        return None
    if not isinstance(wrapper, dict) or not isinstance(wrapper.get(RECORD_FIELD), dict):
        return None
    return wrapper


def unwrap_unverified(raw: bytes | str) -> dict[str, Any] | None:
    """The record of a stored value without checking who wrote it (operator tools only), or None."""
    wrapper = _parse(raw)
    return None if wrapper is None else wrapper[RECORD_FIELD]


class RecordAuthenticator:
    """Signs registry records with this worker's response key; checks them with the workers' public keys."""

    def __init__(self, keyring: KeyRing) -> None:
        self._keys = keyring

    def wrap(self, kind: str, record: dict[str, Any]) -> str:
        """The stored form of a record, signed (KeyConfigurationError where there is no worker key)."""
        signature = self._keys.response_signing_key().sign(_signing_input(kind, record))
        return json.dumps(
            {
                RECORD_FIELD: record,
                RECORD_SIGNATURE_FIELD: {"kid": self._keys.response_signing_kid, "sig": _b64url(signature)},
            },
            separators=(",", ":"),
        )

    def open(self, kind: str, raw: bytes | str) -> dict[str, Any] | None:
        """The record when a configured worker key signed it as this kind; None for anything else."""
        wrapper = _parse(raw)
        if wrapper is None:
            return None
        signature = wrapper.get(RECORD_SIGNATURE_FIELD)
        if not isinstance(signature, dict) or set(wrapper) != {RECORD_FIELD, RECORD_SIGNATURE_FIELD}:
            return None
        kid, sig = signature.get("kid"), signature.get("sig")
        if not isinstance(kid, str) or not isinstance(sig, str):
            return None
        public = self._keys.response_verify_key(kid)
        if public is None:
            return None
        record: dict[str, Any] = wrapper[RECORD_FIELD]
        try:
            raw_signature = _unb64url(sig)
            if len(raw_signature) != _ED25519_SIGNATURE_BYTES or _b64url(raw_signature) != sig:
                return None
            public.verify(raw_signature, _signing_input(kind, record))
        except (binascii.Error, ValueError, CanonicalizationError, InvalidSignature, UnicodeEncodeError):
            return None
        return record
