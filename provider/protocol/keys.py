"""Signing, verification and sealing keys, parsed once from ``SecuritySettings`` and never printed.

Producers hold the signing key; workers hold only what verifies (public PEMs, or the shared secret for HS256).
Every key has an id (``kid``) so keys rotate without downtime: add the new verify kid everywhere, move the
producers' signing kid, then remove the old verify kid. Sealing keys (AES-256) have ids of their own.

Files in ``verify_keys_dir``: ``<kid>.pub.pem`` (EdDSA, RS256, ES256) and ``<kid>.secret`` (HS256); other
files are ignored. A key given both inline and as a file must be the same key.

Responses travel the other way with keys of their own: each worker signs its responses, errors, stream entries
and registry records with its Ed25519 response key (``response_signing_key``, by ``response_signing_kid``);
producers hold only the workers' public keys (``response_verify_keys``, ``<kid>.pub.pem`` files in
``response_verify_keys_dir``). They rotate like the request keys.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TypeAlias

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from provider.protocol.errors import KeyConfigurationError, UnknownKeyError
from provider.protocol.settings import SecuritySettings

__all__ = [
    "AES_KEY_BYTES",
    "ASYMMETRIC_ALGORITHMS",
    "MIN_HS256_SECRET_BYTES",
    "MIN_RSA_KEY_BITS",
    "PRIVATE_KEY_SUFFIX",
    "PUBLIC_KEY_SUFFIX",
    "SECRET_SUFFIX",
    "Algorithm",
    "GeneratedEncryptionKey",
    "GeneratedKeypair",
    "KeyRing",
    "SigningKey",
    "VerifyKey",
    "generate_encryption_key",
    "generate_keypair",
    "valid_kid",
]

Algorithm: TypeAlias = Literal["EdDSA", "RS256", "ES256", "HS256"]
SigningKey: TypeAlias = ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | bytes
VerifyKey: TypeAlias = ed25519.Ed25519PublicKey | rsa.RSAPublicKey | ec.EllipticCurvePublicKey | bytes

ASYMMETRIC_ALGORITHMS = frozenset({"EdDSA", "RS256", "ES256"})
MIN_HS256_SECRET_BYTES = 32
MIN_RSA_KEY_BITS = 2048
RSA_GENERATED_KEY_BITS = 3072
RSA_PUBLIC_EXPONENT = 65537
AES_KEY_BYTES = 32
HS256_GENERATED_SECRET_BYTES = 48
PUBLIC_KEY_SUFFIX = ".pub.pem"
SECRET_SUFFIX = ".secret"  # noqa: S105 (a file name suffix)
AES_KEY_SUFFIX = ".aes"
PRIVATE_KEY_SUFFIX = ".pem"
_PEM_MARKER = "-----BEGIN"
_KID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")

KeyKind = Literal["ed25519", "hs256", "rs256", "es256"]


def valid_kid(kid: object) -> bool:
    """Whether a value can be a key id: 1-64 of ``[A-Za-z0-9._-]``, not starting with a separator."""
    return isinstance(kid, str) and _KID.fullmatch(kid) is not None


def _require_kid(kid: str, what: str) -> str:
    if not valid_kid(kid):
        raise KeyConfigurationError(f"{what} key id is not a valid kid")
    return kid


def _check_signing_type(key: object, algorithm: str, kid: str) -> SigningKey:
    """The key when it suits the algorithm, else KeyConfigurationError."""
    if algorithm == "EdDSA" and isinstance(key, ed25519.Ed25519PrivateKey):
        return key
    if algorithm == "RS256" and isinstance(key, rsa.RSAPrivateKey):
        if key.key_size < MIN_RSA_KEY_BITS:
            raise KeyConfigurationError(f"signing key {kid!r} is shorter than {MIN_RSA_KEY_BITS} bits")
        return key
    if algorithm == "ES256" and isinstance(key, ec.EllipticCurvePrivateKey):
        if not isinstance(key.curve, ec.SECP256R1):
            raise KeyConfigurationError(f"signing key {kid!r} is not on P-256")
        return key
    raise KeyConfigurationError(f"signing key {kid!r} is not a {algorithm} private key")


def _check_verify_type(key: object, algorithm: str, kid: str) -> VerifyKey:
    """The key when it suits the algorithm, else KeyConfigurationError."""
    if algorithm == "EdDSA" and isinstance(key, ed25519.Ed25519PublicKey):
        return key
    if algorithm == "RS256" and isinstance(key, rsa.RSAPublicKey):
        if key.key_size < MIN_RSA_KEY_BITS:
            raise KeyConfigurationError(f"verify key {kid!r} is shorter than {MIN_RSA_KEY_BITS} bits")
        return key
    if algorithm == "ES256" and isinstance(key, ec.EllipticCurvePublicKey):
        if not isinstance(key.curve, ec.SECP256R1):
            raise KeyConfigurationError(f"verify key {kid!r} is not on P-256")
        return key
    raise KeyConfigurationError(f"verify key {kid!r} is not a {algorithm} public key")


def _parse_secret(text: str, kid: str) -> bytes:
    """An HS256 secret: the text itself, long enough, and never a PEM (the classic key-confusion mistake)."""
    secret = text.strip().encode("utf-8")
    if _PEM_MARKER.encode() in secret:
        raise KeyConfigurationError(f"HS256 secret {kid!r} looks like a PEM key")
    if len(secret) < MIN_HS256_SECRET_BYTES:
        raise KeyConfigurationError(f"HS256 secret {kid!r} is shorter than {MIN_HS256_SECRET_BYTES} bytes")
    return secret


def _parse_private(text: str, algorithm: str, kid: str) -> SigningKey:
    """The signing key from its PEM (or the secret, for HS256)."""
    if algorithm == "HS256":
        return _parse_secret(text, kid)
    try:
        key = serialization.load_pem_private_key(text.strip().encode("utf-8"), password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise KeyConfigurationError(f"signing key {kid!r} is not an unencrypted PEM private key") from None
    return _check_signing_type(key, algorithm, kid)


def _parse_public(text: str, algorithm: str, kid: str) -> VerifyKey:
    """A verify key from its public PEM (or the secret, for HS256); private keys are refused here."""
    if algorithm == "HS256":
        return _parse_secret(text, kid)
    data = text.strip().encode("utf-8")
    if b"PRIVATE KEY" in data:
        raise KeyConfigurationError(f"verify key {kid!r} is a private key: workers hold public keys only")
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise KeyConfigurationError(f"verify key {kid!r} is not a PEM public key") from None
    return _check_verify_type(key, algorithm, kid)


def _public_of(key: SigningKey) -> VerifyKey:
    """What verifies a signing key's tokens."""
    if isinstance(key, bytes):
        return key
    return key.public_key()


def _same_key(a: VerifyKey, b: VerifyKey) -> bool:
    """Whether two verify keys are the same key."""
    if isinstance(a, bytes) or isinstance(b, bytes):
        return isinstance(a, bytes) and isinstance(b, bytes) and hmac.compare_digest(a, b)
    der = serialization.Encoding.DER
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    return hmac.compare_digest(a.public_bytes(der, spki), b.public_bytes(der, spki))


def _parse_aes_key(text: str, kid: str) -> bytes:
    """A 32-byte AES key from base64 (standard or URL-safe, padding optional)."""
    cleaned = text.strip()
    padded = cleaned + "=" * (-len(cleaned) % 4)
    try:
        raw = base64.b64decode(padded.replace("-", "+").replace("_", "/"), validate=True)
    except (binascii.Error, ValueError):
        raise KeyConfigurationError(f"encryption key {kid!r} is not base64") from None
    if len(raw) != AES_KEY_BYTES:
        raise KeyConfigurationError(f"encryption key {kid!r} is not {AES_KEY_BYTES} bytes")
    return raw


def _read_text(path: Path, what: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        raise KeyConfigurationError(f"{what} file {path.name!r} cannot be read") from None


def _verify_keys_from_dir(directory: Path, algorithm: str) -> dict[str, VerifyKey]:
    """``<kid>.pub.pem`` (asymmetric) or ``<kid>.secret`` (HS256) files from a directory."""
    if not directory.is_dir():
        raise KeyConfigurationError(f"verify key directory {directory.name!r} does not exist")
    suffix = SECRET_SUFFIX if algorithm == "HS256" else PUBLIC_KEY_SUFFIX
    keys: dict[str, VerifyKey] = {}
    for path in sorted(directory.iterdir()):
        if not path.is_file() or not path.name.endswith(suffix):
            continue
        kid = _require_kid(path.name[: -len(suffix)], "verify")
        keys[kid] = _parse_public(_read_text(path, "verify key"), algorithm, kid)
    return keys


def _response_keys_from_dir(directory: Path) -> dict[str, ed25519.Ed25519PublicKey]:
    """``<kid>.pub.pem`` files (workers' Ed25519 response keys) from a directory."""
    if not directory.is_dir():
        raise KeyConfigurationError(f"response verify key directory {directory.name!r} does not exist")
    keys: dict[str, ed25519.Ed25519PublicKey] = {}
    for path in sorted(directory.iterdir()):
        if path.is_file() and path.name.endswith(PUBLIC_KEY_SUFFIX):
            kid = _require_kid(path.name[: -len(PUBLIC_KEY_SUFFIX)], "response verify")
            keys[kid] = _ed25519_public(_read_text(path, "response verify key"), kid)
    return keys


def _ed25519_public(text: str, kid: str) -> ed25519.Ed25519PublicKey:
    key = _parse_public(text, "EdDSA", kid)
    assert isinstance(key, ed25519.Ed25519PublicKey)
    return key


def _ed25519_private(text: str, kid: str) -> ed25519.Ed25519PrivateKey:
    key = _parse_private(text, "EdDSA", kid)
    assert isinstance(key, ed25519.Ed25519PrivateKey)
    return key


class KeyRing:
    """Parsed keys by id: one signing key, verify keys, AES-256-GCM sealing keys, and the Ed25519 response keys
    (a worker's own signing key, the workers' public keys); repr shows ids only."""

    __slots__ = (
        "_aeads",
        "_algorithm",
        "_encryption_kid",
        "_response_signing_key",
        "_response_signing_kid",
        "_response_verify_keys",
        "_signing_key",
        "_signing_kid",
        "_verify_keys",
    )

    def __init__(
        self,
        *,
        algorithm: Algorithm,
        signing_kid: str = "k1",
        signing_key: SigningKey | None = None,
        verify_keys: Mapping[str, VerifyKey] | None = None,
        encryption_kid: str = "e1",
        encryption_keys: Mapping[str, bytes] | None = None,
        response_signing_kid: str = "w1",
        response_signing_key: ed25519.Ed25519PrivateKey | None = None,
        response_verify_keys: Mapping[str, ed25519.Ed25519PublicKey] | None = None,
    ) -> None:
        self._algorithm: Algorithm = algorithm
        self._signing_kid = _require_kid(signing_kid, "signing")
        self._encryption_kid = _require_kid(encryption_kid, "encryption")
        self._signing_key: SigningKey | None = None
        if signing_key is not None:
            if algorithm == "HS256":
                if not isinstance(signing_key, bytes) or len(signing_key) < MIN_HS256_SECRET_BYTES:
                    raise KeyConfigurationError(
                        f"HS256 secret {signing_kid!r} must be at least {MIN_HS256_SECRET_BYTES} bytes"
                    )
                self._signing_key = signing_key
            else:
                self._signing_key = _check_signing_type(signing_key, algorithm, signing_kid)
        verify: dict[str, VerifyKey] = {}
        for kid, key in (verify_keys or {}).items():
            _require_kid(kid, "verify")
            if algorithm == "HS256":
                if not isinstance(key, bytes) or len(key) < MIN_HS256_SECRET_BYTES:
                    raise KeyConfigurationError(f"HS256 secret {kid!r} must be at least {MIN_HS256_SECRET_BYTES} bytes")
                verify[kid] = key
            else:
                verify[kid] = _check_verify_type(key, algorithm, kid)
        if self._signing_key is not None:
            own = _public_of(self._signing_key)
            known = verify.get(self._signing_kid)
            if known is None:
                # A lone producer-and-worker trusts its own key; with verify keys configured, only those count,
                # so removing a kid from the verify keys revokes it even where its signing key still lies.
                if not verify:
                    verify[self._signing_kid] = own
            elif not _same_key(known, own):
                raise KeyConfigurationError(
                    f"verify key {self._signing_kid!r} does not match the signing key of the same kid"
                )
        self._verify_keys = verify
        aeads: dict[str, AESGCM] = {}
        for kid, raw in (encryption_keys or {}).items():
            _require_kid(kid, "encryption")
            if len(raw) != AES_KEY_BYTES:
                raise KeyConfigurationError(f"encryption key {kid!r} is not {AES_KEY_BYTES} bytes")
            aeads[kid] = AESGCM(raw)
        self._aeads = aeads
        self._response_signing_kid = _require_kid(response_signing_kid, "response signing")
        self._response_signing_key = response_signing_key
        responses: dict[str, ed25519.Ed25519PublicKey] = {}
        for kid, public in (response_verify_keys or {}).items():
            responses[_require_kid(kid, "response verify")] = public
        if response_signing_key is not None:
            own = response_signing_key.public_key()
            known_public = responses.get(response_signing_kid)
            if known_public is None:
                if not responses:  # a lone worker-and-producer trusts its own key, as for requests
                    responses[response_signing_kid] = own
            elif not _same_key(known_public, own):
                raise KeyConfigurationError(
                    f"response verify key {response_signing_kid!r} does not match the response signing key"
                )
        self._response_verify_keys = responses

    @classmethod
    def from_settings(cls, security: SecuritySettings) -> KeyRing:
        """Parse every key the settings name (inline values, signing key file, verify key directory)."""
        algorithm: Algorithm = security.algorithm
        signing_kid = _require_kid(security.signing_kid, "signing")
        signing_text: str | None = None
        if security.signing_key is not None:
            signing_text = security.signing_key.get_secret_value()
        elif security.signing_key_file is not None:
            signing_text = _read_text(security.signing_key_file, "signing key")
        signing_key = None if signing_text is None else _parse_private(signing_text, algorithm, signing_kid)
        verify: dict[str, VerifyKey] = {}
        for kid, secret in security.verify_keys.items():
            verify[_require_kid(kid, "verify")] = _parse_public(secret.get_secret_value(), algorithm, kid)
        if security.verify_keys_dir is not None:
            for kid, key in _verify_keys_from_dir(security.verify_keys_dir, algorithm).items():
                if kid in verify and not _same_key(verify[kid], key):
                    raise KeyConfigurationError(f"verify key {kid!r} is configured twice with different keys")
                verify[kid] = key
        encryption = {
            _require_kid(kid, "encryption"): _parse_aes_key(secret.get_secret_value(), kid)
            for kid, secret in security.encryption_keys.items()
        }
        if security.encryption_keys_dir is not None:
            for path in sorted(security.encryption_keys_dir.glob(f"*{AES_KEY_SUFFIX}")):
                kid = _require_kid(path.name[: -len(AES_KEY_SUFFIX)], "encryption")
                key = _parse_aes_key(_read_text(path, "encryption key").strip(), kid)
                if kid in encryption and encryption[kid] != key:
                    raise KeyConfigurationError(f"encryption key {kid!r} is configured twice with different keys")
                encryption[kid] = key
        response_kid = _require_kid(security.response_signing_kid, "response signing")
        response_text: str | None = None
        if security.response_signing_key is not None:
            response_text = security.response_signing_key.get_secret_value()
        elif security.response_signing_key_file is not None:
            response_text = _read_text(security.response_signing_key_file, "response signing key")
        response_key = None if response_text is None else _ed25519_private(response_text, response_kid)
        responses = {
            _require_kid(kid, "response verify"): _ed25519_public(secret.get_secret_value(), kid)
            for kid, secret in security.response_verify_keys.items()
        }
        if security.response_verify_keys_dir is not None:
            for kid, public in _response_keys_from_dir(security.response_verify_keys_dir).items():
                if kid in responses and not _same_key(responses[kid], public):
                    raise KeyConfigurationError(f"response verify key {kid!r} is configured twice with different keys")
                responses[kid] = public
        return cls(
            algorithm=algorithm,
            signing_kid=signing_kid,
            signing_key=signing_key,
            verify_keys=verify,
            encryption_kid=security.encryption_kid,
            encryption_keys=encryption,
            response_signing_kid=response_kid,
            response_signing_key=response_key,
            response_verify_keys=responses,
        )

    @property
    def algorithm(self) -> Algorithm:
        """The one JWS algorithm this ring signs and accepts."""
        return self._algorithm

    @property
    def signing_kid(self) -> str:
        """The kid put in the header of every token this side signs."""
        return self._signing_kid

    @property
    def can_sign(self) -> bool:
        """Whether a signing key is loaded (producers)."""
        return self._signing_key is not None

    @property
    def verify_kids(self) -> tuple[str, ...]:
        """The key ids whose tokens verify here."""
        return tuple(sorted(self._verify_keys))

    @property
    def encryption_kid(self) -> str:
        """The kid this side seals with."""
        return self._encryption_kid

    @property
    def encryption_kids(self) -> tuple[str, ...]:
        """The key ids this side can open."""
        return tuple(sorted(self._aeads))

    def signing_key(self) -> SigningKey:
        """The key that signs tokens; KeyConfigurationError on a side that only verifies."""
        if self._signing_key is None:
            raise KeyConfigurationError("no signing key is configured")
        return self._signing_key

    def verify_key(self, kid: str) -> VerifyKey:
        """The verify key for a token's kid; UnknownKeyError when there is none."""
        key = self._verify_keys.get(kid)
        if key is None:
            raise UnknownKeyError("the token's key id is not known here", field="kid")
        return key

    def aead(self, kid: str) -> AESGCM:
        """The AES-256-GCM cipher for a sealed part's kid; UnknownKeyError when there is none."""
        aead = self._aeads.get(kid)
        if aead is None:
            raise UnknownKeyError("the sealed part's key id is not known here", field="kid")
        return aead

    def sealing_aead(self) -> tuple[str, AESGCM]:
        """The kid and cipher this side seals with; KeyConfigurationError when that key is missing."""
        aead = self._aeads.get(self._encryption_kid)
        if aead is None:
            raise KeyConfigurationError("encryption is on but the encryption key is not configured")
        return self._encryption_kid, aead

    @property
    def response_signing_kid(self) -> str:
        """The kid a worker signs responses with."""
        return self._response_signing_kid

    @property
    def can_sign_responses(self) -> bool:
        """Whether a response signing key is loaded (workers)."""
        return self._response_signing_key is not None

    @property
    def response_verify_kids(self) -> tuple[str, ...]:
        """The worker key ids whose responses verify here."""
        return tuple(sorted(self._response_verify_keys))

    def response_signing_key(self) -> ed25519.Ed25519PrivateKey:
        """The worker's response signing key; KeyConfigurationError where there is none."""
        if self._response_signing_key is None:
            raise KeyConfigurationError("no response signing key is configured (workers need one)")
        return self._response_signing_key

    def response_verify_key(self, kid: str) -> ed25519.Ed25519PublicKey | None:
        """A worker's public response key by kid, or None."""
        return self._response_verify_keys.get(kid)

    def __repr__(self) -> str:
        return (
            f"KeyRing(algorithm={self._algorithm!r}, signing_kid={self._signing_kid!r}, "
            f"can_sign={self.can_sign!r}, verify_kids={list(self.verify_kids)!r}, "
            f"encryption_kid={self._encryption_kid!r}, encryption_kids={list(self.encryption_kids)!r}, "
            f"response_signing_kid={self._response_signing_kid!r}, "
            f"response_verify_kids={list(self.response_verify_kids)!r})"
        )

    __str__ = __repr__


@dataclass(frozen=True, repr=False)
class GeneratedKeypair:
    """A new signing key and what verifies it, as text; ``files()`` names them for ``verify_keys_dir``."""

    kid: str
    algorithm: Algorithm
    private: str
    public: str

    def files(self) -> dict[str, str]:
        """File name → content: ``<kid>.pem`` + ``<kid>.pub.pem``, or ``<kid>.secret`` for HS256."""
        if self.algorithm == "HS256":
            return {f"{self.kid}{SECRET_SUFFIX}": self.private}
        return {
            f"{self.kid}{PRIVATE_KEY_SUFFIX}": self.private,
            f"{self.kid}{PUBLIC_KEY_SUFFIX}": self.public,
        }

    def __repr__(self) -> str:
        return f"GeneratedKeypair(kid={self.kid!r}, algorithm={self.algorithm!r})"


@dataclass(frozen=True, repr=False)
class GeneratedEncryptionKey:
    """A new AES-256 sealing key, base64."""

    kid: str
    key_b64: str

    def __repr__(self) -> str:
        return f"GeneratedEncryptionKey(kid={self.kid!r})"

    def files(self) -> dict[str, str]:
        """File name → content for ``encryption_keys_dir``: ``<kid>.aes``."""
        return {f"{self.kid}{AES_KEY_SUFFIX}": self.key_b64}


def _private_pem(key: ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode("ascii")


def _public_pem(key: ed25519.Ed25519PublicKey | rsa.RSAPublicKey | ec.EllipticCurvePublicKey) -> str:
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode("ascii")


def generate_keypair(kind: KeyKind = "ed25519", kid: str = "k1") -> GeneratedKeypair:
    """A fresh signing key for an operator: Ed25519 by default; HS256 secret, RSA-3072 or P-256."""
    _require_kid(kid, "generated")
    if kind == "hs256":
        secret = secrets.token_urlsafe(HS256_GENERATED_SECRET_BYTES)
        return GeneratedKeypair(kid=kid, algorithm="HS256", private=secret, public=secret)
    key: ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
    algorithm: Algorithm
    if kind == "ed25519":
        key, algorithm = ed25519.Ed25519PrivateKey.generate(), "EdDSA"
    elif kind == "rs256":
        key = rsa.generate_private_key(public_exponent=RSA_PUBLIC_EXPONENT, key_size=RSA_GENERATED_KEY_BITS)
        algorithm = "RS256"
    elif kind == "es256":
        key, algorithm = ec.generate_private_key(ec.SECP256R1()), "ES256"
    else:
        raise KeyConfigurationError(f"unknown key kind {kind!r}")
    return GeneratedKeypair(
        kid=kid, algorithm=algorithm, private=_private_pem(key), public=_public_pem(key.public_key())
    )


def generate_encryption_key(kid: str = "e1") -> GeneratedEncryptionKey:
    """A fresh AES-256 sealing key, base64, for ``encryption_keys``."""
    _require_kid(kid, "generated")
    return GeneratedEncryptionKey(kid=kid, key_b64=base64.b64encode(secrets.token_bytes(AES_KEY_BYTES)).decode())


def generated_security(kid: str = "k1", encryption_kid: str = "e1", worker_kid: str = "w1") -> SecuritySettings:
    """Security settings holding fresh Ed25519 pairs (requests, responses) and an AES-256 key in memory, for one
    process that both produces and serves (tests, benchmarks, demos); operators generate key files with
    ``vllm-fleet keys``."""
    pair = generate_keypair("ed25519", kid=kid)
    worker = generate_keypair("ed25519", kid=worker_kid)
    sealing = generate_encryption_key(kid=encryption_kid)
    return SecuritySettings(
        signing_key=pair.private,
        signing_kid=pair.kid,
        verify_keys={pair.kid: pair.public},
        encryption_keys={sealing.kid: sealing.key_b64},
        encryption_kid=sealing.kid,
        response_signing_key=worker.private,
        response_signing_kid=worker.kid,
        response_verify_keys={worker.kid: worker.public},
    )
