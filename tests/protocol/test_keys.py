"""Key rings from settings: parsed once, the right kind for the algorithm, never printed."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from pydantic import SecretStr

from provider.protocol import (
    KeyConfigurationError,
    KeyRing,
    UnknownKeyError,
    generate_encryption_key,
    generate_keypair,
)
from provider.protocol.keys import valid_kid
from provider.settings import SecuritySettings

from . import aes_key, keypair


def settings(**values: object) -> SecuritySettings:
    return SecuritySettings(**values)  # type: ignore[arg-type]


def pem_public(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> str:
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


def pem_private(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()


@pytest.mark.parametrize("algorithm", ["EdDSA", "HS256", "RS256", "ES256"])
def test_from_settings(algorithm: str) -> None:
    pair = keypair(algorithm)
    ring = KeyRing.from_settings(
        settings(
            algorithm=algorithm,
            signing_key=SecretStr(pair.private),
            encryption_keys={"e1": SecretStr(aes_key())},
        )
    )
    assert ring.algorithm == algorithm
    assert ring.can_sign
    assert ring.verify_kids == ("k1",)
    assert ring.encryption_kids == ("e1",)
    assert isinstance(ring.aead("e1"), AESGCM)
    assert ring.sealing_aead()[0] == "e1"
    text = repr(ring) + str(ring)
    assert pair.private not in text
    assert aes_key() not in text
    for line in pair.private.splitlines()[1:-1]:
        assert line not in text


def test_worker_ring_holds_only_public_keys() -> None:
    ring = KeyRing.from_settings(settings(verify_keys={"k1": SecretStr(keypair("EdDSA").public)}))
    assert not ring.can_sign
    assert isinstance(ring.verify_key("k1"), ed25519.Ed25519PublicKey)
    with pytest.raises(KeyConfigurationError):
        ring.signing_key()
    with pytest.raises(UnknownKeyError):
        ring.verify_key("k2")
    with pytest.raises(UnknownKeyError):
        ring.aead("e1")
    with pytest.raises(KeyConfigurationError):
        ring.sealing_aead()


def test_private_key_refused_as_verify_key() -> None:
    with pytest.raises(KeyConfigurationError, match="private"):
        KeyRing.from_settings(settings(verify_keys={"k1": SecretStr(keypair("EdDSA").private)}))


@pytest.mark.parametrize(
    ("algorithm", "public"),
    [
        ("EdDSA", lambda: keypair("ES256").public),
        ("ES256", lambda: keypair("EdDSA").public),
        ("RS256", lambda: keypair("ES256").public),
        ("ES256", lambda: pem_public(ec.generate_private_key(ec.SECP384R1()))),
        ("RS256", lambda: pem_public(rsa.generate_private_key(public_exponent=65537, key_size=1024))),  # noqa: S505
    ],
)
def test_wrong_kind_of_verify_key(algorithm: str, public: object) -> None:
    with pytest.raises(KeyConfigurationError):
        KeyRing.from_settings(settings(algorithm=algorithm, verify_keys={"k1": SecretStr(public())}))  # type: ignore[operator]


@pytest.mark.parametrize("algorithm", ["EdDSA", "RS256", "ES256"])
def test_wrong_kind_of_signing_key(algorithm: str) -> None:
    other = {"EdDSA": "ES256", "RS256": "EdDSA", "ES256": "EdDSA"}[algorithm]
    with pytest.raises(KeyConfigurationError):
        KeyRing.from_settings(settings(algorithm=algorithm, signing_key=SecretStr(keypair(other).private)))


@pytest.mark.parametrize("text", ["not a pem", "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----"])
def test_garbage_signing_key(text: str) -> None:
    with pytest.raises(KeyConfigurationError) as info:
        KeyRing.from_settings(settings(signing_key=SecretStr(text)))
    assert "AAAA" not in str(info.value)


def test_garbage_verify_key() -> None:
    with pytest.raises(KeyConfigurationError):
        KeyRing.from_settings(settings(verify_keys={"k1": SecretStr("-----BEGIN PUBLIC KEY-----\nAA\n-----END")}))


def test_hs256_secret_rules() -> None:
    with pytest.raises(KeyConfigurationError, match="shorter"):
        KeyRing.from_settings(settings(algorithm="HS256", signing_key=SecretStr("short")))
    with pytest.raises(KeyConfigurationError, match="PEM"):
        KeyRing.from_settings(settings(algorithm="HS256", verify_keys={"k1": SecretStr(keypair("EdDSA").public)}))
    with pytest.raises(KeyConfigurationError):
        KeyRing(algorithm="HS256", verify_keys={"k1": b"short"})
    with pytest.raises(KeyConfigurationError):
        KeyRing(algorithm="HS256", signing_key=b"short")


def test_signing_key_and_verify_key_of_the_same_kid_must_match() -> None:
    with pytest.raises(KeyConfigurationError, match="does not match"):
        KeyRing.from_settings(
            settings(
                signing_key=SecretStr(keypair("EdDSA").private),
                verify_keys={"k1": SecretStr(keypair("EdDSA", "k1", 1).public)},
            )
        )
    ring = KeyRing.from_settings(
        settings(
            signing_key=SecretStr(keypair("EdDSA").private),
            verify_keys={"k1": SecretStr(keypair("EdDSA").public)},
        )
    )
    assert ring.verify_kids == ("k1",)


def test_directory_and_inline_must_agree(tmp_path: Path) -> None:
    (tmp_path / "k1.pub.pem").write_text(keypair("EdDSA", "k1", 1).public)
    with pytest.raises(KeyConfigurationError, match="twice"):
        KeyRing.from_settings(
            settings(verify_keys={"k1": SecretStr(keypair("EdDSA").public)}, verify_keys_dir=tmp_path)
        )
    with pytest.raises(KeyConfigurationError, match="does not exist"):
        KeyRing.from_settings(settings(verify_keys_dir=tmp_path / "missing"))
    with pytest.raises(KeyConfigurationError, match="cannot be read"):
        KeyRing.from_settings(settings(signing_key_file=tmp_path / "missing.pem"))


def test_bad_kid_file_names(tmp_path: Path) -> None:
    (tmp_path / "bad kid.pub.pem").write_text(keypair("EdDSA").public)
    with pytest.raises(KeyConfigurationError):
        KeyRing.from_settings(settings(verify_keys_dir=tmp_path))


@pytest.mark.parametrize(
    "text", ["not base64!", base64.b64encode(b"x" * 16).decode(), base64.b64encode(b"x" * 33).decode()]
)
def test_bad_encryption_keys(text: str) -> None:
    with pytest.raises(KeyConfigurationError):
        KeyRing.from_settings(settings(encryption_keys={"e1": SecretStr(text)}))


def test_encryption_key_forms() -> None:
    raw = bytes(range(32))
    for text in (base64.b64encode(raw).decode(), base64.urlsafe_b64encode(raw).decode().rstrip("=")):
        ring = KeyRing.from_settings(settings(encryption_keys={"e1": SecretStr(text)}))
        assert ring.encryption_kids == ("e1",)
    with pytest.raises(KeyConfigurationError):
        KeyRing(algorithm="EdDSA", encryption_keys={"e1": b"short"})


@pytest.mark.parametrize("kid", ["", "-x", "a b", "x" * 65, "é"])
def test_invalid_kids(kid: str) -> None:
    assert not valid_kid(kid)
    with pytest.raises(KeyConfigurationError):
        KeyRing.from_settings(settings(signing_kid=kid))


def test_generate_keypairs() -> None:
    for kind, algorithm in (("ed25519", "EdDSA"), ("es256", "ES256"), ("hs256", "HS256")):
        pair = generate_keypair(kind, "k7")  # type: ignore[arg-type]
        assert pair.algorithm == algorithm
        assert pair.private not in repr(pair)
        ring = KeyRing.from_settings(
            settings(algorithm=algorithm, signing_key=SecretStr(pair.private), signing_kid="k7")
        )
        assert ring.verify_kids == ("k7",)
        files = pair.files()
        if algorithm == "HS256":
            assert files == {"k7.secret": pair.private}
        else:
            assert set(files) == {"k7.pem", "k7.pub.pem"}
            assert "PRIVATE" not in files["k7.pub.pem"]
    with pytest.raises(KeyConfigurationError):
        generate_keypair("dsa", "k1")  # type: ignore[arg-type]
    with pytest.raises(KeyConfigurationError):
        generate_keypair("ed25519", "bad kid")


def test_generate_encryption_key() -> None:
    key = generate_encryption_key("e9")
    assert len(base64.b64decode(key.key_b64)) == 32
    assert key.key_b64 not in repr(key)
    assert generate_encryption_key().key_b64 != generate_encryption_key().key_b64


def test_keyring_direct_construction() -> None:
    private = ed25519.Ed25519PrivateKey.generate()
    ring = KeyRing(algorithm="EdDSA", signing_key=private, verify_keys={"k0": private.public_key()})
    assert ring.verify_kids == ("k0",), "configured verify keys are the only ones trusted"
    alone = KeyRing(algorithm="EdDSA", signing_key=private)
    assert alone.verify_kids == ("k1",), "a ring with no verify keys trusts its own signing key"
    with pytest.raises(KeyConfigurationError):
        KeyRing(algorithm="EdDSA", verify_keys={"k0": b"x" * 40})
    with pytest.raises(KeyConfigurationError):
        KeyRing(algorithm="RS256", signing_key=private)
    assert pem_private(private).startswith("-----BEGIN PRIVATE KEY-----")


def test_generated_security_signs_and_verifies_its_own_envelopes() -> None:
    from provider.protocol import EnvelopeCodec, generated_security

    security = generated_security(kid="g1", encryption_kid="ge1")
    assert security.encrypt
    assert list(security.verify_keys) == ["g1"]
    codec = EnvelopeCodec(security)
    envelope = codec.build_request(operation="chat", task_name="vllm.chat", lane="l", params={"x": 1}, timeout_s=5)
    assert "sealed_params" in envelope
    assert codec.verify_request(envelope, lane="l", task_name="vllm.chat").params == {"x": 1}
