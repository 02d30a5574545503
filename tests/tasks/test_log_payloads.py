"""``LOG_PAYLOADS``: payload text reaches the worker's log only when it is switched on (a debug aid)."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

from tests.tasks.conftest import CHAT_MODEL, Fleet

SECRET = "payload-marker-7f3a9c do not log me"
RESULT_TIMEOUT_S = 20


@pytest.fixture
def log_payloads(fleet: Fleet) -> Iterator[None]:
    """``LOG_PAYLOADS`` on for one test (the worker reads it per request)."""
    from tasks.runtime import runtime

    settings = runtime().settings
    settings.log_payloads = True
    try:
        yield
    finally:
        settings.log_payloads = False


def _ask(caplog: pytest.LogCaptureFixture) -> str:
    from tasks import chat

    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="tasks.execution")
    reply = chat.delay(model=CHAT_MODEL, messages=[{"role": "user", "content": SECRET}]).get(timeout=RESULT_TIMEOUT_S)
    assert reply["content"]
    return "\n".join(record.getMessage() for record in caplog.records)


def test_payloads_are_never_logged_by_default(fleet: Fleet, caplog: pytest.LogCaptureFixture) -> None:
    from tasks.runtime import runtime

    assert runtime().settings.log_payloads is False
    logged = _ask(caplog)
    assert caplog.records  # the worker did log (at debug), just never the payload
    assert SECRET not in logged


def test_log_payloads_logs_the_request_params(
    fleet: Fleet, log_payloads: None, caplog: pytest.LogCaptureFixture
) -> None:
    logged = _ask(caplog)
    params = [r for r in caplog.records if r.name == "tasks.execution" and "request params" in r.getMessage()]
    assert len(params) == 1
    assert params[0].levelno == logging.DEBUG
    assert SECRET in params[0].getMessage()
    assert SECRET in logged
