"""RFC 8785 (JCS) canonical JSON, the one form every hash in the protocol is taken over.

``rfc8785`` is the reference. Most protocol values serialize identically with the C JSON encoder and
sorted keys, several times faster: strings without surrogates or characters above U+D7FF (where UTF-16 and
code-point key order could differ), integers below 16 digits, booleans, null, and floats written in plain
decimals (Python and ECMAScript agree on the shortest digits; they differ only on exponents and on the ``.0``
of integral floats). ``canonical_json`` takes that path when the output shows nothing else, turns integral
floats below 2**53 into integers first (JCS writes ``1.0`` as ``1``), and hands anything else to ``rfc8785``.
A property test holds the two equal.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from json.encoder import encode_basestring

import rfc8785

__all__ = [
    "CanonicalizationError",
    "canonical_json",
    "compact_json",
    "sha256_hex",
    "sha256_hex_bytes",
]

CanonicalizationError = rfc8785.CanonicalizationError

_MAX_EXACT_FLOAT = 2.0**53
# A JSON string literal as the encoder writes it (quotes and backslashes escaped), unrolled for speed.
_STRING_LITERAL = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"')
# Outside strings, numbers the two forms may write differently: exponents, long digit runs, integral floats.
_RISKY_NUMBER = re.compile(r"[0-9][eE]|[0-9]{16}|\.0(?![0-9])")
_EXPONENT_OR_LONG = re.compile(r"[0-9][eE]|[0-9]{16}")
# Surrogates and everything above them: key order (UTF-16 vs code points) or escaping could differ.
_RISKY_CHARACTER = re.compile("[\ud800-\U0010ffff]")
_DIGIT = re.compile(r"[0-9]")


def _not_json(value: object) -> object:
    raise TypeError("not a JSON value")


def _c_encoder(*, sort_keys: bool) -> Callable[[object], str]:
    """A compact, UTF-8 (not ASCII-escaped), NaN-refusing encoder, built once (the C one when available)."""
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is not None:
        chunks = make(None, _not_json, encode_basestring, None, ":", ",", sort_keys, False, False)
        return lambda value: "".join(chunks(value, 0))
    encoder = json.JSONEncoder(
        sort_keys=sort_keys, separators=(",", ":"), ensure_ascii=False, allow_nan=False, default=_not_json
    )
    return encoder.encode


_encode_sorted = _c_encoder(sort_keys=True)
compact_json = _c_encoder(sort_keys=False)
compact_json.__doc__ = "Compact JSON text (no spaces, UTF-8 characters kept, NaN refused); for sizes, not hashes."


def _integral_floats_to_int(value: object) -> object:
    """A copy with every integral float below 2**53 as an int (JCS writes 1.0 as 1, -0.0 as 0)."""
    if isinstance(value, float):
        if value.is_integer() and abs(value) < _MAX_EXACT_FLOAT:
            return int(value)
        return value
    if isinstance(value, dict):
        return {key: _integral_floats_to_int(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_integral_floats_to_int(item) for item in value]
    return value


def _fast(value: object) -> bytes | None:
    """The canonical form through the C encoder, or None when it might differ from RFC 8785."""
    try:
        text = _encode_sorted(value)
    except (TypeError, ValueError, RecursionError):
        return None
    if _RISKY_CHARACTER.search(text) is not None:
        return None
    if _DIGIT.search(text) is None:
        return text.encode("utf-8")
    numbers = _STRING_LITERAL.sub("", text)
    if _RISKY_NUMBER.search(numbers) is None:
        return text.encode("utf-8")
    if _EXPONENT_OR_LONG.search(numbers) is not None:
        return None
    try:
        text = _encode_sorted(_integral_floats_to_int(value))
    except (TypeError, ValueError, RecursionError):
        return None
    if _RISKY_NUMBER.search(_STRING_LITERAL.sub("", text)) is not None:
        return None
    return text.encode("utf-8")


def canonical_json(value: object) -> bytes:
    """The RFC 8785 canonical JSON bytes of a JSON value; CanonicalizationError for what JSON cannot hold."""
    fast = _fast(value)
    if fast is not None:
        return fast
    try:
        return rfc8785.dumps(value)  # type: ignore[arg-type]
    except CanonicalizationError:
        raise
    except (ValueError, TypeError, RecursionError) as exc:  # lone surrogates in keys, nesting too deep
        raise CanonicalizationError("value has no canonical JSON form") from exc


def sha256_hex_bytes(data: bytes) -> str:
    """Lower-case hex SHA-256 of some bytes."""
    return hashlib.sha256(data).hexdigest()


def sha256_hex(value: object) -> str:
    """Lower-case hex SHA-256 of a value's canonical JSON (the protocol's ``*_hash`` claims)."""
    return hashlib.sha256(canonical_json(value)).hexdigest()
