"""Interop with joserfc: our tokens verify there, and its tokens over our claims verify here.

joserfc warns that the JOSE name "EdDSA" is deprecated by RFC 9864 in favour of "Ed25519"; PyJWT and the
seeds use "EdDSA", so the tests silence exactly that warning.
"""

from __future__ import annotations

import warnings
from typing import Any

import pytest
from joserfc import jwt as jose_jwt
from joserfc.errors import SecurityWarning
from joserfc.jwk import OctKey, OKPKey

from . import LANE, NOW, TASK, build, claims_of, keypair, producer, worker


def jose_key(algorithm: str, *, private: bool) -> Any:
    pair = keypair(algorithm)
    if algorithm == "HS256":
        return OctKey.import_key(pair.private.encode())
    return OKPKey.import_key(pair.private if private else pair.public)


@pytest.mark.parametrize("algorithm", ["EdDSA", "HS256"])
def test_our_tokens_verify_with_joserfc(algorithm: str) -> None:
    envelope = build(producer(algorithm))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="EdDSA is deprecated", category=SecurityWarning)
        token = jose_jwt.decode(envelope["signed_token"], jose_key(algorithm, private=False), algorithms=[algorithm])
    assert token.header["alg"] == algorithm
    assert token.header["kid"] == "k1"
    assert token.claims == claims_of(envelope)


@pytest.mark.parametrize("algorithm", ["EdDSA", "HS256"])
def test_joserfc_tokens_verify_with_ours(algorithm: str) -> None:
    envelope = build(producer(algorithm))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="EdDSA is deprecated", category=SecurityWarning)
        envelope["signed_token"] = jose_jwt.encode(
            {"alg": algorithm, "kid": "k1"},
            claims_of(envelope),
            jose_key(algorithm, private=True),
            algorithms=[algorithm],
        )
    verified = worker(algorithm).verify_request(envelope, lane=LANE, task_name=TASK, now=NOW + 1)
    assert verified.request_id == envelope["request_id"]


def test_joserfc_token_with_another_key_is_refused() -> None:
    from provider.protocol import InvalidSignatureError

    envelope = build(producer())
    other = OKPKey.import_key(keypair("EdDSA", "k1", 1).private)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="EdDSA is deprecated", category=SecurityWarning)
        envelope["signed_token"] = jose_jwt.encode(
            {"alg": "EdDSA", "kid": "k1"}, claims_of(envelope), other, algorithms=["EdDSA"]
        )
    with pytest.raises(InvalidSignatureError):
        worker().verify_request(envelope, lane=LANE, task_name=TASK, now=NOW + 1)
