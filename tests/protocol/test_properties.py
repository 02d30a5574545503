"""Any single mutation of a valid envelope is refused with an EnvelopeError: never accepted, nothing else."""

from __future__ import annotations

import copy
import functools
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from provider.protocol import EnvelopeCodec, EnvelopeError, canonical_json

from . import LANE, NOW, PARAMS, TASK, build, producer

Path = tuple[str | int, ...]

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**53) + 1, max_value=2**53 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3),
    max_leaves=8,
)
BASE64_TEXT = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=-_.!"


@functools.cache
def codec(encrypt: bool) -> EnvelopeCodec:
    return producer(encrypt=encrypt)


@functools.cache
def envelope(encrypt: bool) -> dict[str, Any]:
    params = {
        **PARAMS,
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {"a": [1, 2.5]}}}],
    }
    return build(codec(encrypt), params=params, provider_instance="gpu1")


def paths(value: object, prefix: Path = ()) -> list[Path]:
    """Every path to a value inside (objects and arrays), the root excluded."""
    found: list[Path] = []
    if isinstance(value, dict):
        for key, item in value.items():
            found.append((*prefix, key))
            found.extend(paths(item, (*prefix, key)))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found.append((*prefix, index))
            found.extend(paths(item, (*prefix, index)))
    return found


def containers(value: object, prefix: Path = ()) -> list[Path]:
    """Every path to an object (where a key can be added), the root included."""
    found: list[Path] = [prefix] if isinstance(value, dict) else []
    if isinstance(value, dict):
        for key, item in value.items():
            found.extend(containers(item, (*prefix, key)))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found.extend(containers(item, (*prefix, index)))
    return found


def get(value: Any, path: Path) -> Any:
    for step in path:
        value = value[step]
    return value


def same_json(a: object, b: object) -> bool:
    """Whether two values are the same JSON value (30 and 30.0 are)."""
    try:
        return canonical_json(a) == canonical_json(b)
    except ValueError:
        return False


def assert_refused(encrypt: bool, mutated: dict[str, Any]) -> None:
    with pytest.raises(EnvelopeError):
        codec(encrypt).verify_request(mutated, lane=LANE, task_name=TASK, now=NOW + 1)


def test_the_base_envelopes_verify() -> None:
    for encrypt in (True, False):
        codec(encrypt).verify_request(envelope(encrypt), lane=LANE, task_name=TASK, now=NOW + 1)


@settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(encrypt=st.booleans(), data=st.data())
def test_changing_any_value_is_refused(encrypt: bool, data: st.DataObject) -> None:
    mutated = copy.deepcopy(envelope(encrypt))
    path = data.draw(st.sampled_from(paths(mutated)))
    new = data.draw(json_values)
    assume(not same_json(new, get(mutated, path)))
    get(mutated, path[:-1])[path[-1]] = new
    assert_refused(encrypt, mutated)


@settings(max_examples=100, deadline=None, database=None)
@given(encrypt=st.booleans(), data=st.data())
def test_deleting_any_key_is_refused(encrypt: bool, data: st.DataObject) -> None:
    mutated = copy.deepcopy(envelope(encrypt))
    path = data.draw(st.sampled_from(paths(mutated)))
    parent = get(mutated, path[:-1])
    if isinstance(parent, list):
        parent.pop(path[-1])  # type: ignore[arg-type]
    else:
        del parent[path[-1]]
    assert_refused(encrypt, mutated)


@settings(max_examples=100, deadline=None, database=None)
@given(encrypt=st.booleans(), data=st.data())
def test_adding_any_key_is_refused(encrypt: bool, data: st.DataObject) -> None:
    mutated = copy.deepcopy(envelope(encrypt))
    path = data.draw(st.sampled_from(containers(mutated)))
    target = get(mutated, path)
    key = data.draw(st.text(min_size=1, max_size=10))
    assume(key not in target)
    target[key] = data.draw(json_values)
    assert_refused(encrypt, mutated)


@settings(max_examples=150, deadline=None, database=None)
@given(data=st.data())
def test_flipping_any_character_is_refused(data: st.DataObject) -> None:
    encrypt = data.draw(st.booleans())
    mutated = copy.deepcopy(envelope(encrypt))
    fields: list[Path] = [("signed_token",)]
    if encrypt:
        fields += [("sealed_params", "ciphertext"), ("sealed_params", "nonce"), ("sealed_params", "kid")]
    path = data.draw(st.sampled_from(fields))
    text = get(mutated, path)
    index = data.draw(st.integers(min_value=0, max_value=len(text) - 1))
    char = data.draw(st.sampled_from(BASE64_TEXT))
    assume(char != text[index])
    get(mutated, path[:-1])[path[-1]] = text[:index] + char + text[index + 1 :]
    assert_refused(encrypt, mutated)


@settings(max_examples=150, deadline=None, database=None)
@given(garbage=st.dictionaries(st.text(max_size=20), json_values, max_size=8) | json_values)
def test_garbage_is_refused_with_an_envelope_error(garbage: Any) -> None:
    with pytest.raises(EnvelopeError):
        codec(True).verify_request(garbage, lane=LANE, task_name=TASK, now=NOW + 1)


@settings(max_examples=100, deadline=None, database=None)
@given(data=st.data())
def test_any_single_field_of_a_valid_envelope_as_garbage(data: st.DataObject) -> None:
    mutated = copy.deepcopy(envelope(True))
    name = data.draw(st.sampled_from(sorted(mutated)))
    new = data.draw(json_values | st.binary(max_size=8) | st.just(float("nan")))
    assume(not same_json(new, mutated[name]))
    mutated[name] = new
    with pytest.raises(EnvelopeError):
        codec(True).verify_request(mutated, lane=LANE, task_name=TASK, now=NOW + 1)
