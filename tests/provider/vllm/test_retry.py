"""The one retry policy: retryable errors again with jittered backoff, never past the deadline; others at once."""

from __future__ import annotations

import time

import pytest

from provider.vllm.errors import (
    BadRequestError,
    ProviderConnectionError,
    ProviderError,
    ProviderTimeoutError,
    ServerBusyError,
)
from provider.vllm.retry import backoff_delay_s, call_with_retries

FAST = {"base_delay_s": 0.001, "max_delay_s": 0.002}


class Flaky:
    """Fails with the given errors in turn, then answers ``"ok"``; records the time left it was given."""

    def __init__(self, *failures: ProviderError) -> None:
        self.failures = list(failures)
        self.time_left: list[float] = []

    def __call__(self, time_left_s: float) -> str:
        self.time_left.append(time_left_s)
        if self.failures:
            raise self.failures.pop(0)
        return "ok"


def test_retryable_errors_are_tried_again_until_success() -> None:
    call = Flaky(ProviderConnectionError("refused"), ServerBusyError("busy", status_code=503))
    retried: list[tuple[int, str]] = []
    result = call_with_retries(
        call, deadline=time.time() + 30, on_retry=lambda attempt, exc: retried.append((attempt, exc.code)), **FAST
    )
    assert result == "ok"
    assert retried == [(1, "connection_error"), (2, "server_busy")]
    assert len(call.time_left) == 3
    assert all(0 < left <= 30 for left in call.time_left)
    assert call.time_left == sorted(call.time_left, reverse=True)  # each try gets what is left, never more


def test_a_non_retryable_error_fails_at_once() -> None:
    call = Flaky(BadRequestError("max_tokens is too large", status_code=400))
    with pytest.raises(BadRequestError, match="max_tokens"):
        call_with_retries(call, deadline=time.time() + 30, **FAST)
    assert len(call.time_left) == 1


def test_an_exception_that_is_not_a_provider_error_is_never_retried() -> None:
    calls: list[float] = []

    def broken(time_left_s: float) -> str:
        calls.append(time_left_s)
        raise KeyError("bug")

    with pytest.raises(KeyError):
        call_with_retries(broken, deadline=time.time() + 30, **FAST)
    assert len(calls) == 1


def test_a_passed_deadline_raises_a_timeout_without_calling() -> None:
    call = Flaky()
    with pytest.raises(ProviderTimeoutError, match="deadline"):
        call_with_retries(call, deadline=time.time() - 1, **FAST)
    assert call.time_left == []


def test_no_retry_sleeps_past_the_deadline() -> None:
    """When the next backoff would end past the deadline, the last error is raised instead of sleeping."""
    now = [1000.0]

    def slow_busy(time_left_s: float) -> str:
        now[0] += 0.2  # each try takes 0.2 s of the request's clock
        raise ServerBusyError("busy", status_code=503)

    tries: list[float] = []
    with pytest.raises(ServerBusyError):
        call_with_retries(
            lambda left: tries.append(left) or slow_busy(left),
            deadline=1000.5,
            base_delay_s=0.05,
            max_delay_s=0.05,
            clock=lambda: now[0],
        )
    # tries at 0.5, 0.3 and 0.1 s left; after the third, 0.1 s past the deadline: no sleep, no fourth try
    assert tries == pytest.approx([0.5, 0.3, 0.1])


def test_backoff_is_full_jitter_under_an_exponential_ceiling() -> None:
    for attempt, ceiling in [(1, 0.2), (2, 0.4), (3, 0.8), (6, 5.0), (30, 5.0)]:
        delays = [backoff_delay_s(attempt, base_delay_s=0.2, max_delay_s=5.0) for _ in range(200)]
        assert all(0.0 <= delay <= ceiling for delay in delays)
        assert max(delays) > ceiling / 2  # jitter spreads over the range, not stuck at zero
