"""Our faster JWS segment decoder is a drop-in for PyJWT's: same results, never more lenient."""

from __future__ import annotations

import base64

import jwt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jwt.exceptions import DecodeError

from bench.codec import bench_codec
from provider.protocol.jws import StrictJWS as _StrictJWS

ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_+/=!. "


def stock(segment: bytes) -> bytes | None:
    try:
        decoded: bytes = jwt.PyJWS._decode_base64url_segment(segment, "x")
    except DecodeError:
        return None
    return decoded


def ours(segment: bytes) -> bytes | None:
    try:
        return _StrictJWS._decode_base64url_segment(segment, "x")
    except DecodeError:
        return None


def test_the_overridden_method_still_exists() -> None:
    assert "_decode_base64url_segment" in vars(jwt.PyJWS)


@settings(max_examples=300, deadline=None, database=None)
@given(st.binary(max_size=64))
def test_same_bytes_for_valid_segments(data: bytes) -> None:
    segment = base64.urlsafe_b64encode(data).rstrip(b"=")
    assert ours(segment) == stock(segment) == data


@settings(max_examples=500, deadline=None, database=None)
@given(st.text(alphabet=ALPHABET, max_size=24))
def test_never_more_lenient(text: str) -> None:
    segment = text.encode()
    mine = ours(segment)
    if mine is not None:
        assert stock(segment) == mine


def test_padding_is_refused() -> None:
    assert stock(b"YQ==") == b"a"
    assert ours(b"YQ==") is None
    assert ours(b"YR") is None


@pytest.mark.filterwarnings("ignore")
def test_bench_codec_runs() -> None:
    results = bench_codec(seconds=0.1, rounds=1)
    assert set(results) == {
        "eddsa_sign_seal_per_s",
        "eddsa_verify_open_per_s",
        "hs256_sign_seal_per_s",
        "hs256_verify_open_per_s",
        "ed25519_bare_verify_per_s",
        "eddsa_verify_ratio",
        "response_seal_per_s",
        "response_sign_seal_per_s",
        "response_open_per_s",
        "response_verify_open_per_s",
    }
    assert all(value > 0 for value in results.values())
