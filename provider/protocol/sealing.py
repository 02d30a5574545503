"""AES-256-GCM sealing of payloads (cryptography's AESGCM), bound to the request, the lane and a purpose.

A sealed part is ``{"alg": "A256GCM", "kid", "nonce", "ciphertext"}``, nonce and ciphertext (with its
16-byte tag) in standard base64 with padding, read strictly (the unused bits of the last character must be
zero, so a sealed part has exactly one spelling). A fresh random 12-byte nonce seals each message. The
associated data is the canonical JSON of ``[purpose, request_id, lane]``: a sealed result cannot be replayed
as sealed params, nor moved to another request or lane.
"""

from __future__ import annotations

import binascii
import os
from collections.abc import Mapping

from cryptography.exceptions import InvalidTag

from provider.protocol.canonical import canonical_json, compact_json
from provider.protocol.envelope import SealedBox
from provider.protocol.errors import DecryptFailedError, MalformedError
from provider.protocol.keys import KeyRing

__all__ = [
    "NONCE_BYTES",
    "PURPOSE_PARAMS",
    "PURPOSE_RESULT",
    "SEAL_ALGORITHM",
    "TAG_BYTES",
    "associated_data",
    "has_one_spelling",
    "open_parts",
    "open_sealed",
    "seal",
]

SEAL_ALGORITHM = "A256GCM"
NONCE_BYTES = 12
TAG_BYTES = 16
PURPOSE_PARAMS = "llm.fleet.request.params.v2"
PURPOSE_RESULT = "llm.fleet.response.result.v2"
PURPOSE_STREAM = "llm.fleet.stream.entry.v2"
_SEALED_FIELDS = frozenset({"alg", "kid", "nonce", "ciphertext"})
# Bits the last character of a base64 text leaves unused, by the text's length modulo 4 (-1: impossible).
_UNUSED_BITS = (0, -1, 4, 2)
_B64_INDEX = {
    char: index for index, char in enumerate(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")
}


def associated_data(purpose: str, request_id: str, lane: str) -> bytes:
    """The AEAD associated data: canonical JSON of ``[purpose, request_id, lane]``."""
    parts = [purpose, request_id, lane]
    if purpose.isascii() and request_id.isascii() and lane.isascii():
        return compact_json(parts).encode("ascii")  # for ASCII strings this is the RFC 8785 form
    return canonical_json(parts)


def _b64(data: bytes) -> str:
    return binascii.b2a_base64(data, newline=False).decode("ascii")


def has_one_spelling(data: bytes, alphabet_index: Mapping[int, int]) -> bool:
    """Whether the unused bits of a base64 text's last character are zero (else two texts decode alike)."""
    stripped = data.rstrip(b"=")
    if not stripped:
        return True
    unused_bits = _UNUSED_BITS[len(stripped) % 4]
    if unused_bits < 0:
        return False
    index = alphabet_index.get(stripped[-1])
    return index is not None and index & ((1 << unused_bits) - 1) == 0


def _unb64(text: object, what: str) -> bytes:
    """Strict base64: the alphabet, padding, and a single spelling; MalformedError otherwise."""
    if not isinstance(text, str) or not text.isascii():
        raise MalformedError(f"sealed {what} must be a base64 string", field=what)
    encoded = text.encode("ascii")
    try:
        data = binascii.a2b_base64(encoded, strict_mode=True)
    except (binascii.Error, ValueError):
        raise MalformedError(f"sealed {what} is not base64", field=what) from None
    if len(encoded) % 4 or not has_one_spelling(encoded, _B64_INDEX):
        raise MalformedError(f"sealed {what} is not canonical base64", field=what)
    return data


def seal(keyring: KeyRing, plaintext: bytes, *, purpose: str, request_id: str, lane: str) -> dict[str, str]:
    """Seal bytes with the ring's encryption key; a new random nonce every time."""
    kid, aead = keyring.sealing_aead()
    nonce = os.urandom(NONCE_BYTES)
    ciphertext = aead.encrypt(nonce, plaintext, associated_data(purpose, request_id, lane))
    return {"alg": SEAL_ALGORITHM, "kid": kid, "nonce": _b64(nonce), "ciphertext": _b64(ciphertext)}


def open_sealed(
    keyring: KeyRing, box: Mapping[str, object] | SealedBox, *, purpose: str, request_id: str, lane: str
) -> bytes:
    """The plaintext: MalformedError (shape), UnknownKeyError (kid), DecryptFailedError (AEAD)."""
    if isinstance(box, SealedBox):
        return open_parts(
            keyring, box.kid, box.nonce, box.ciphertext, purpose=purpose, request_id=request_id, lane=lane
        )
    if not isinstance(box, Mapping) or set(box) != _SEALED_FIELDS:
        raise MalformedError("a sealed part has exactly alg, kid, nonce and ciphertext", field="sealed")
    if box["alg"] != SEAL_ALGORITHM:
        raise MalformedError("unsupported sealing algorithm", field="alg")
    kid = box["kid"]
    if not isinstance(kid, str):
        raise MalformedError("sealed kid must be a string", field="kid")
    return open_parts(keyring, kid, box["nonce"], box["ciphertext"], purpose=purpose, request_id=request_id, lane=lane)


def open_parts(
    keyring: KeyRing,
    kid: str,
    nonce_b64: object,
    ciphertext_b64: object,
    *,
    purpose: str,
    request_id: str,
    lane: str,
) -> bytes:
    """Open a sealed part given as its pieces (the ``A256GCM`` algorithm already checked)."""
    aead = keyring.aead(kid)
    nonce = _unb64(nonce_b64, "nonce")
    ciphertext = _unb64(ciphertext_b64, "ciphertext")
    if len(nonce) != NONCE_BYTES:
        raise DecryptFailedError("the sealed nonce has the wrong length", field="nonce")
    if len(ciphertext) < TAG_BYTES:
        raise DecryptFailedError("the sealed part is truncated", field="ciphertext")
    try:
        return aead.decrypt(nonce, ciphertext, associated_data(purpose, request_id, lane))
    except InvalidTag:
        raise DecryptFailedError("the sealed part could not be opened", field="ciphertext") from None
