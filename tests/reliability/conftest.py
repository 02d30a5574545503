"""A fleet for the reliability tests: the counting simulator and real worker processes on the session's Redis
databases (or on private brokers a test starts itself), with the producer configured in this process."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import redis

from provider.protocol import generated_security
from provider.settings import SecuritySettings, Settings
from tests.conftest import BACKEND_DB, BROKER_DB, STATE_DB, flush_test_databases
from tests.reliability.harness import CountingSimulator, Worker, fault_settings, simulator_config, wait_until


@dataclass
class LiveFleet:
    """A simulator, one worker process, and the settings the producer here uses."""

    settings: Settings
    sim: CountingSimulator
    worker: Worker
    state: redis.Redis


@pytest.fixture(scope="session")
def fault_security() -> SecuritySettings:
    return generated_security(kid="rel-k1", encryption_kid="rel-e1")


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
    flush_test_databases(redis_url)
    sim = CountingSimulator(simulator_config())
    sim.start()
    settings = fault_settings(
        broker_url=f"{redis_url}/{BROKER_DB}",
        backend_url=f"{redis_url}/{BACKEND_DB}",
        state_url=f"{redis_url}/{STATE_DB}",
        prefix=f"rel-{uuid.uuid4().hex[:8]}",
        security=fault_security,
        instances={"sim-a": sim.url},
        concurrency=16,
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
