"""Session fixtures: real Redis and RabbitMQ, the vLLM simulator over HTTP, and an in-process Celery worker.

A server a test needs and cannot reach skips the test on a laptop and fails it in CI (``CI=true``).
Every session uses its own Redis databases and key prefix, and its own RabbitMQ vhost, and cleans them.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import pytest
import redis

pytest_plugins = ("celery.contrib.pytest",)

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
REDIS_HOST, REDIS_PORT = "127.0.0.1", 6379
RABBIT_HOST, RABBIT_PORT = "127.0.0.1", 5672
# Each session gets its own vhost; the Redis databases can be moved (VFT_REDIS_DBS="4,5,6") so that two
# sessions on one host do not flush each other's data.
TEST_VHOST = f"vllm-fleet-test-{os.getpid()}"
BROKER_DB, BACKEND_DB, STATE_DB = (int(n) for n in os.environ.get("VFT_REDIS_DBS", "10,11,12").split(","))


_T = TypeVar("_T")
POLL_INTERVAL_S = 0.05


def wait_until(
    predicate: Callable[[], _T],
    timeout_s: float = 15.0,
    what: str = "condition",
    *,
    interval_s: float = POLL_INTERVAL_S,
    ignore: tuple[type[BaseException], ...] = (),
) -> _T:
    """Poll ``predicate`` until it returns something true (returned) or fail the test after ``timeout_s``; the
    tests' one way to wait for something to happen (never a fixed sleep). ``ignore``: exceptions that mean "not
    yet" (a server still starting)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            value = predicate()
        except ignore:
            value = None  # type: ignore[assignment]
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what} not reached within {timeout_s} s")
        time.sleep(interval_s)


def _reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


def require_server(name: str, host: str, port: int) -> None:
    """Skip locally, fail in CI, when a server the test needs does not answer."""
    if _reachable(host, port):
        return
    message = f"{name} is not reachable on {host}:{port}"
    if IN_CI:
        pytest.fail(message + " (CI=true: a missing server fails the run)")
    pytest.skip(message)


@pytest.fixture(scope="session")
def redis_url() -> str:
    """Base URL of the test Redis (databases are chosen per use)."""
    require_server("Redis", REDIS_HOST, REDIS_PORT)
    return f"redis://{REDIS_HOST}:{REDIS_PORT}"


@pytest.fixture
def state_client(redis_url: str) -> Iterator[redis.Redis]:
    """A client on the fleet-state database (streams, ledger), closed after the test."""
    connection = redis.Redis.from_url(f"{redis_url}/{STATE_DB}")
    yield connection
    connection.close()


@pytest.fixture(scope="session")
def rabbitmq_url() -> Iterator[str]:
    """A fresh RabbitMQ vhost for this session, deleted afterwards."""
    require_server("RabbitMQ", RABBIT_HOST, RABBIT_PORT)
    _rabbitmqctl("delete_vhost", TEST_VHOST, check=False)
    _rabbitmqctl("add_vhost", TEST_VHOST)
    _rabbitmqctl("set_permissions", "-p", TEST_VHOST, "guest", ".*", ".*", ".*")
    yield f"amqp://guest:guest@{RABBIT_HOST}:{RABBIT_PORT}/{TEST_VHOST}"
    _rabbitmqctl("delete_vhost", TEST_VHOST, check=False)


def _rabbitmqctl(*args: str, check: bool = True) -> None:
    result = subprocess.run(["rabbitmqctl", "-q", *args], capture_output=True, text=True, timeout=60)
    if check and result.returncode != 0:
        raise RuntimeError(f"rabbitmqctl {' '.join(args)} failed: {result.stderr.strip()}")


@pytest.fixture(scope="session")
def session_prefix() -> str:
    """A key prefix no other session shares."""
    return f"vft-{uuid.uuid4().hex[:8]}"


def flush_test_databases(redis_url: str) -> None:
    """Empty the Redis databases tests own (never the default ones)."""
    import redis

    for db in (BROKER_DB, BACKEND_DB, STATE_DB):
        redis.Redis.from_url(f"{redis_url}/{db}").flushdb()


def pytest_configure(config: Any) -> None:
    """Document the markers (also declared in pyproject)."""
    config.addinivalue_line("markers", "slow: takes more than a few seconds")
