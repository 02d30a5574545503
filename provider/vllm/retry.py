"""The one retry policy: retryable provider errors are tried again with exponential backoff and full jitter,
never past the request's deadline; anything else fails at once."""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import TypeVar

from provider.vllm.errors import ProviderError, ProviderTimeoutError, is_retryable

__all__ = ["DEFAULT_BASE_DELAY_S", "DEFAULT_MAX_DELAY_S", "backoff_delay_s", "call_with_retries"]

DEFAULT_BASE_DELAY_S = 0.2
DEFAULT_MAX_DELAY_S = 5.0
_T = TypeVar("_T")


def backoff_delay_s(attempt: int, *, base_delay_s: float, max_delay_s: float) -> float:
    """Full-jitter exponential backoff for the given 1-based attempt."""
    ceiling = min(max_delay_s, base_delay_s * (2 ** (attempt - 1)))
    return random.uniform(0.0, ceiling)


def call_with_retries(
    call: Callable[[float], _T],
    *,
    deadline: float,
    base_delay_s: float = DEFAULT_BASE_DELAY_S,
    max_delay_s: float = DEFAULT_MAX_DELAY_S,
    on_retry: Callable[[int, ProviderError], None] | None = None,
    clock: Callable[[], float] = time.time,
) -> _T:
    """Run ``call(time_left_s)`` until it succeeds, fails for good, or the deadline (epoch s) leaves no time.

    The last error is raised when retries run out; a deadline reached raises ``ProviderTimeoutError``.
    """
    attempt = 0
    while True:
        attempt += 1
        time_left_s = deadline - clock()
        if time_left_s <= 0:
            raise ProviderTimeoutError("the request's deadline passed before the server answered")
        try:
            return call(time_left_s)
        except ProviderError as exc:
            if not is_retryable(exc):
                raise
            delay_s = backoff_delay_s(attempt, base_delay_s=base_delay_s, max_delay_s=max_delay_s)
            if clock() + delay_s >= deadline:
                raise
            if on_retry is not None:
                on_retry(attempt, exc)
            time.sleep(delay_s)
