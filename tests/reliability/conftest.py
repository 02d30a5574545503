"""A fleet for the reliability tests: the counting simulator and real worker processes on the session's Redis
databases (or on private brokers a test starts itself), with the producer configured in this process."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import redis

from provider.protocol import generated_security
from provider.settings import SecuritySettings, Settings
from tests.conftest import (
    BACKEND_DB,
    BROKER_DB,
    RABBIT_HOST,
    RABBIT_PORT,
    STATE_DB,
    _rabbitmqctl,
    flush_test_databases,
    require_server,
)
from tests.reliability.harness import CountingSimulator, Worker, fault_settings, full, simulator_config, wait_until


@dataclass
class LiveFleet:
    """A simulator, one worker process, and the settings the producer here uses."""

    settings: Settings
    sim: CountingSimulator
    worker: Worker
    state: redis.Redis


@pytest.fixture(scope="session")
def fault_security() -> SecuritySettings:
    # Scenarios ask for deadlines beyond the harness's short default timeouts: tokens may live two minutes.
    return generated_security(kid="rel-k1", encryption_kid="rel-e1").model_copy(update={"max_token_lifetime_s": 120.0})


def use(settings: Settings) -> None:
    """Point this process's producer at ``settings``."""
    from tasks import configure
    from tasks.routing import invalidate_route_cache

    configure(settings)
    invalidate_route_cache()


def wait_for_offerings(settings: Settings, count: int, timeout_s: float = 30.0) -> None:
    from tasks.runtime import runtime

    wait_until(lambda: len(runtime().registry.all()) >= count, timeout_s, "worker registering its offerings")


@pytest.fixture(scope="module")
def live_fleet(redis_url: str, fault_security: SecuritySettings) -> Iterator[LiveFleet]:
    """One worker process serving one simulator, on the session's Redis broker database."""
    yield from _live_fleet(f"{redis_url}/{BROKER_DB}", redis_url, fault_security)


@pytest.fixture(scope="session")
def reliability_vhost() -> Iterator[str]:
    """A RabbitMQ vhost of the reliability tests' own (their lane limits differ from other tests': a lane
    declared twice with other arguments is refused), deleted afterwards."""
    require_server("RabbitMQ", RABBIT_HOST, RABBIT_PORT)
    vhost = f"vllm-fleet-reliability-{os.getpid()}"
    _rabbitmqctl("delete_vhost", vhost, check=False)
    _rabbitmqctl("add_vhost", vhost)
    _rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
    yield f"amqp://guest:guest@{RABBIT_HOST}:{RABBIT_PORT}/{vhost}"
    _rabbitmqctl("delete_vhost", vhost, check=False)


@pytest.fixture(scope="module")
def rabbit_fleet(redis_url: str, reliability_vhost: str, fault_security: SecuritySettings) -> Iterator[LiveFleet]:
    """The same on RabbitMQ (results and state on Redis)."""
    yield from _live_fleet(reliability_vhost, redis_url, fault_security)


def _live_fleet(broker_url: str, redis_url: str, fault_security: SecuritySettings) -> Iterator[LiveFleet]:
    flush_test_databases(redis_url)
    sim = CountingSimulator(simulator_config())
    sim.start()
    settings = fault_settings(
        broker_url=broker_url,
        backend_url=f"{redis_url}/{BACKEND_DB}",
        state_url=f"{redis_url}/{STATE_DB}",
        prefix=f"rel-{uuid.uuid4().hex[:8]}",
        security=fault_security,
        instances={"sim-a": sim.url},
        concurrency=16,
        circuit_half_open_after_s=1.0,
    )
    use(settings)
    worker = Worker(settings, "rel-a", concurrency=18)
    try:
        wait_for_offerings(settings, 2)
        yield LiveFleet(settings, sim, worker, redis.Redis.from_url(settings.redis_url))
    finally:
        worker.stop()
        sim.stop()
        flush_test_databases(redis_url)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Outside the full profile (``make reliability``), full-profile scenarios are deselected, not skipped."""
    if full():
        return
    kept = [item for item in items if item.get_closest_marker("full_profile") is None]
    dropped = [item for item in items if item.get_closest_marker("full_profile") is not None]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept
