"""RFC 8785 canonical JSON: the fast path always agrees with the ``rfc8785`` reference."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pytest
import rfc8785
from hypothesis import given, settings
from hypothesis import strategies as st

from provider.protocol.canonical import CanonicalizationError, canonical_json, sha256_hex

SAFE_INT = 2**53 - 1

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-SAFE_INT, max_value=SAFE_INT)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.sampled_from([0.0, -0.0, 1.0, 100.0, 0.7, 1e16, 1e21, 1e-7, 5e-324, 2.0**53, 123456789012345.6])
    | st.text()
)
json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=8), children, max_size=5),
    max_leaves=25,
)


@settings(max_examples=400, deadline=None, database=None)
@given(json_values)
def test_matches_reference(value: Any) -> None:
    assert canonical_json(value) == rfc8785.dumps(value)


@settings(max_examples=200, deadline=None, database=None)
@given(
    st.dictionaries(
        st.text(alphabet=st.characters(min_codepoint=0xD000, max_codepoint=0x1F680, exclude_categories=("Cs",))),
        st.integers(0, 9),
    )
)
def test_key_order_is_utf16(value: dict[str, int]) -> None:
    assert canonical_json(value) == rfc8785.dumps(value)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ({"b": 1, "a": [True, None, "x"]}, b'{"a":[true,null,"x"],"b":1}'),
        ({"t": 1.0, "u": -0.0, "v": 0.7}, b'{"t":1,"u":0,"v":0.7}'),
        ([1e21, 1e-7, 1e16], b"[1e+21,1e-7,10000000000000000]"),
        ('\u00e9\n\x01"\\', '"\u00e9\\n\\u0001\\"\\\\"'.encode()),
        ({"\ue000": 1, "\U0001f600": 2}, '{"\U0001f600":2,"\ue000":1}'.encode()),
    ],
)
def test_known_forms(value: Any, expected: bytes) -> None:
    assert canonical_json(value) == expected


@pytest.mark.parametrize(
    "value", [2**53, -(2**60), float("nan"), float("inf"), {1: "a"} | {"b": 2}, object(), {"\ud800": 1}]
)
def test_refused(value: Any) -> None:
    with pytest.raises(CanonicalizationError):
        canonical_json(value)


def test_deep_nesting_is_refused() -> None:
    value: Any = []
    for _ in range(5000):
        value = [value]
    with pytest.raises(CanonicalizationError):
        canonical_json(value)


def test_sha256_hex() -> None:
    assert sha256_hex({"a": 1}) == hashlib.sha256(b'{"a":1}').hexdigest()
    assert sha256_hex({}) == hashlib.sha256(b"{}").hexdigest()
    assert json.loads(canonical_json({"x": [1, 2]})) == {"x": [1, 2]}
