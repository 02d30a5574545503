"""The caller's error model: every provider and envelope error maps to a documented code of one ``FleetError`` tree."""

from __future__ import annotations

import ast
import inspect
import pickle
import re
from pathlib import Path

import pytest

from provider.protocol import codes, errors
from provider.protocol.errors import (
    ERROR_CLASSES,
    FLEET_ERROR_CLASSES,
    EnvelopeError,
    FleetError,
    FleetTimeout,
    KeyConfiguration,
    ProviderFailed,
    RequestRefused,
    as_fleet_error,
    fleet_error_class,
)
from provider.vllm import errors as provider_errors
from provider.vllm.errors import ProviderError, ProviderStatusError, StreamErrorFrame

from . import producer
from .test_response import verified

ROOT = Path(__file__).resolve().parents[2]
DOCUMENTED = {"docs/errors.md": (ROOT / "docs" / "errors.md").read_text()}


def _provider_error_classes() -> list[type[ProviderError]]:
    found = [
        cls
        for _, cls in inspect.getmembers(provider_errors, inspect.isclass)
        if issubclass(cls, ProviderError) and cls.__module__ == provider_errors.__name__
    ]
    assert len(found) >= 15  # the whole tree, not an import that found nothing
    return found


def _instance(cls: type[ProviderError]) -> ProviderError:
    if issubclass(cls, ProviderStatusError):
        status = {"BadRequestError": 400, "AuthenticationError": 401, "NotFoundError": 404, "ServerBusyError": 503}
        return cls("vLLM said no", status_code=status.get(cls.__name__, 500 if cls.retryable else 409))
    return cls("vLLM said no")


def _drawn_tree() -> dict[str, tuple[str, str]]:
    """Class name -> (code, retryable column) as the errors module's docstring draws the FleetError tree."""
    doc = errors.__doc__ or ""
    tree = doc[doc.index("    FleetError ") :]
    rows = re.findall(r"[└├]── (\w+)\s+(\S+(?: \S+ \S+\))?)\s+(yes|no)\s", tree)
    return {name: (code, retryable) for name, code, retryable in rows}


@pytest.mark.parametrize("cls", _provider_error_classes(), ids=lambda cls: cls.__name__)
def test_every_provider_error_reaches_the_caller_as_a_documented_code(cls: type[ProviderError]) -> None:
    worker = producer()
    request = verified(worker)
    failure = _instance(cls)
    envelope = worker.error(request, failure)
    with pytest.raises(FleetError) as info:
        worker.open_response(envelope, request_id=request.request_id)
    caught = info.value
    assert caught.code == failure.code
    assert caught.code in codes.PROVIDER_CODES
    assert caught.code in codes.CALLER_CODES
    assert isinstance(caught, ProviderFailed)
    assert type(caught) is fleet_error_class(caught.code)
    assert caught.retryable is failure.retryable
    assert not isinstance(caught, EnvelopeError)
    for where, text in DOCUMENTED.items():
        assert f"`{caught.code}`" in text, f"{caught.code} is not documented in {where}"


def test_a_stream_error_frame_with_a_status_reads_as_that_status() -> None:
    worker = producer()
    request = verified(worker)
    envelope = worker.error(request, StreamErrorFrame("bad", status_code=400))
    with pytest.raises(FleetError) as info:
        worker.open_response(envelope, request_id=request.request_id)
    assert info.value.code == codes.BAD_REQUEST
    assert info.value.retryable is False


@pytest.mark.parametrize("cls", list(ERROR_CLASSES.values()), ids=lambda cls: cls.__name__)
def test_every_envelope_error_reaches_the_caller_as_a_documented_code(cls: type[EnvelopeError]) -> None:
    refusal = cls(field="params")
    mapped = as_fleet_error(refusal)
    assert isinstance(mapped, RequestRefused)
    assert mapped.code == cls.code
    assert mapped.code in codes.ENVELOPE_CODES
    assert mapped.retryable is False
    assert mapped.metadata == {"field": "params"}
    worker = producer()
    request = verified(worker)
    with pytest.raises(RequestRefused) as info:  # the same refusal, told by a worker
        worker.open_response(worker.error(request, refusal), request_id=request.request_id)
    assert info.value.code == cls.code
    for where, text in DOCUMENTED.items():
        assert f"`{cls.code}`" in text, f"{cls.code} is not documented in {where}"


def test_every_caller_code_has_one_class_drawn_in_the_docstring() -> None:
    drawn = _drawn_tree()
    for code in codes.FLEET_CODES | codes.PROVIDER_CODES | {codes.KEY_CONFIGURATION}:
        cls = fleet_error_class(code)
        assert cls.code == code
        assert drawn[cls.__name__][0] == code
        assert drawn[cls.__name__][1] == ("yes" if cls.retryable else "no")
    for cls in FLEET_ERROR_CLASSES.values():
        assert cls.__name__ in errors.__all__
    assert set(FLEET_ERROR_CLASSES) <= codes.CALLER_CODES
    assert drawn["RequestRefused"][1] == "no"
    for code in codes.FLEET_CODES:
        for where, text in DOCUMENTED.items():
            assert f"`{code}`" in text, f"{code} is not documented in {where}"


def test_fleet_timeout_is_one_definition() -> None:
    """However it is built, a fleet_timeout is a retryable FleetTimeout (the old call sites disagreed)."""
    for retryable in (True, False, None):
        error = FleetError("late", code=codes.FLEET_TIMEOUT, retryable=retryable)
        assert type(error) is FleetTimeout
        assert error.retryable is True
    assert FleetTimeout().code == codes.FLEET_TIMEOUT
    assert str(FleetTimeout()) == "no result before the request's deadline"


def test_callers_catch_fleet_error_with_a_typed_code() -> None:
    for cls in FLEET_ERROR_CLASSES.values():
        with pytest.raises(FleetError) as info:
            raise cls("it failed", request_id="r1", metadata={"field": "x"})
        caught = info.value
        assert (caught.code, caught.message, caught.request_id, caught.metadata) == (
            cls.code,
            "it failed",
            "r1",
            {"field": "x"},
        )
        copied = pickle.loads(pickle.dumps(caught))  # noqa: S301 (our own bytes)
        assert type(copied) is cls
        assert (copied.code, copied.message, copied.retryable) == (caught.code, caught.message, caught.retryable)


def test_a_code_this_side_does_not_know_is_kept_with_its_flag() -> None:
    newer = FleetError("from a newer worker", code="quota_exceeded", retryable=True)
    assert type(newer) is FleetError
    assert (newer.code, newer.retryable) == ("quota_exceeded", True)
    assert FleetError("no code").code == codes.PROVIDER_ERROR
    assert type(FleetError("no code")) is ProviderFailed


def test_a_subclass_refuses_a_code_that_is_not_its_own() -> None:
    with pytest.raises(ValueError, match="FleetTimeout"):
        FleetTimeout("late", code=codes.STREAM_GAP)
    with pytest.raises(ValueError, match="RequestRefused"):
        RequestRefused("no", code=codes.FLEET_TIMEOUT)
    assert type(RequestRefused("keys", code=codes.KEY_CONFIGURATION)) is KeyConfiguration
    assert RequestRefused("late", code=codes.EXPIRED).code == codes.EXPIRED


def _literal_codes(path: Path) -> list[str]:
    """``code="..."`` keyword arguments written as string literals."""
    tree = ast.parse(path.read_text())
    return [
        f"{path.relative_to(ROOT)}:{node.lineno}"
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        for keyword in node.keywords
        if keyword.arg == "code"
        and isinstance(keyword.value, ast.Constant)
        and isinstance(keyword.value.value, str)
        and not (isinstance(node.func, ast.Attribute) and node.func.attr == "labels")  # a metric label
    ]


def test_raise_sites_name_codes_never_literals() -> None:
    found = [
        site
        for package in ("provider", "tasks")
        for path in (ROOT / package).rglob("*.py")
        for site in _literal_codes(path)
    ]
    assert found == []
