"""AES-256-GCM sealing: bound to purpose, request and lane; strict about its encoding."""

from __future__ import annotations

import base64
from typing import Any

import pytest
from pydantic import SecretStr

from provider.protocol import (
    PURPOSE_PARAMS,
    PURPOSE_RESULT,
    DecryptFailedError,
    KeyRing,
    MalformedError,
    UnknownKeyError,
    open_sealed,
    seal,
)
from provider.protocol.sealing import associated_data
from provider.settings import SecuritySettings

from . import LANE, OTHER_LANE, aes_key

PLAINTEXT = b'{"messages":[{"role":"user","content":"hi"}]}'


def ring(kid: str = "e1", variant: int = 0) -> KeyRing:
    return KeyRing.from_settings(
        SecuritySettings(encryption_keys={kid: SecretStr(aes_key(kid, variant))}, encryption_kid=kid)
    )


def sealed() -> dict[str, str]:
    return seal(ring(), PLAINTEXT, purpose=PURPOSE_PARAMS, request_id="r-1", lane=LANE)


def open_(box: Any, keys: KeyRing | None = None, **binding: str) -> bytes:
    values = {"purpose": PURPOSE_PARAMS, "request_id": "r-1", "lane": LANE, **binding}
    return open_sealed(keys or ring(), box, **values)


def test_round_trip_and_shape() -> None:
    box = sealed()
    assert set(box) == {"alg", "kid", "nonce", "ciphertext"}
    assert box["alg"] == "A256GCM"
    assert box["kid"] == "e1"
    assert len(base64.b64decode(box["nonce"])) == 12
    assert len(base64.b64decode(box["ciphertext"])) == len(PLAINTEXT) + 16
    assert open_(box) == PLAINTEXT


def test_fresh_nonce_every_time() -> None:
    assert sealed()["nonce"] != sealed()["nonce"]


@pytest.mark.parametrize(
    "binding",
    [{"purpose": PURPOSE_RESULT}, {"request_id": "r-2"}, {"lane": OTHER_LANE}],
)
def test_bound_to_purpose_request_and_lane(binding: dict[str, str]) -> None:
    with pytest.raises(DecryptFailedError):
        open_(sealed(), **binding)


def test_wrong_key_and_unknown_kid() -> None:
    with pytest.raises(DecryptFailedError):
        open_(sealed(), ring(variant=1))
    with pytest.raises(UnknownKeyError):
        open_(sealed(), ring("e2"))


def test_tampered_and_truncated() -> None:
    box = sealed()
    raw = bytearray(base64.b64decode(box["ciphertext"]))
    raw[0] ^= 0x80
    with pytest.raises(DecryptFailedError):
        open_({**box, "ciphertext": base64.b64encode(bytes(raw)).decode()})
    for cut in (bytes(raw[:-1]), bytes(raw[:15]), b""):
        with pytest.raises(DecryptFailedError):
            open_({**box, "ciphertext": base64.b64encode(cut).decode()})
    nonce = bytearray(base64.b64decode(box["nonce"]))
    nonce[0] ^= 1
    with pytest.raises(DecryptFailedError):
        open_({**box, "nonce": base64.b64encode(bytes(nonce)).decode()})
    with pytest.raises(DecryptFailedError):
        open_({**box, "nonce": base64.b64encode(b"x" * 8).decode()})


def test_one_spelling_only() -> None:
    box = sealed()
    text = box["ciphertext"]
    assert text.endswith("=")
    stripped = text.rstrip("=")
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    index = alphabet.index(stripped[-1])
    other = alphabet[index | 1] if index % 2 == 0 else alphabet[index & ~1]
    assert base64.b64decode(stripped[:-1] + other + text[len(stripped) :]) == base64.b64decode(text)
    with pytest.raises(MalformedError):
        open_({**box, "ciphertext": stripped[:-1] + other + text[len(stripped) :]})
    with pytest.raises(MalformedError):
        open_({**box, "ciphertext": stripped})
    with pytest.raises(MalformedError):
        open_({**box, "ciphertext": text.replace("+", "-").replace("/", "_") + "!"})


@pytest.mark.parametrize(
    "change",
    [{"alg": "A128GCM"}, {"kid": 5}, {"nonce": 5}, {"extra": "x"}, {"ciphertext": "é"}],
)
def test_malformed_boxes(change: dict[str, Any]) -> None:
    with pytest.raises(MalformedError):
        open_({**sealed(), **change})


def test_missing_field_and_non_mapping() -> None:
    box = sealed()
    del box["nonce"]
    with pytest.raises(MalformedError):
        open_(box)
    with pytest.raises(MalformedError):
        open_(["not", "a", "box"])


def test_associated_data_is_canonical() -> None:
    assert associated_data("p", "r", "l") == b'["p","r","l"]'
    assert associated_data("p", "r\u00e9", "l") == '["p","r\u00e9","l"]'.encode()
