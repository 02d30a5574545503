"""A live fleet per broker: the simulator over HTTP, signed envelopes, and an in-process threads worker.

The ``fleet`` fixture is parametrized over Redis and RabbitMQ brokers (results and shared state stay on
Redis); pytest groups the tests by broker, so each worker starts once per broker per session.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import redis
from celery.contrib.testing.worker import start_worker

from provider.protocol import generated_security
from provider.settings import InstanceSettings, LaneSettings, SecuritySettings, Settings, Timeouts
from simulator.config import ServedModel, SimulatorConfig
from simulator.testing import SimulatorServer
from tests.conftest import BACKEND_DB, BROKER_DB, STATE_DB, flush_test_databases, wait_until

CHAT_MODEL = "qwen3-6-27b"
SMALL_MODEL = "small-chat"
EMBED_MODEL = "minilm"
WORKER_CONCURRENCY = 8


def fleet_security() -> SecuritySettings:
    """Fresh Ed25519 signing (requests, answers) and AES-256 sealing keys for one session; tokens may live two
    minutes (tests ask for longer timeouts than the session's deadlines)."""
    security = generated_security(kid="test-k1", encryption_kid="test-e1")
    return security.model_copy(update={"max_token_lifetime_s": 120.0})


def simulator_config() -> SimulatorConfig:
    """Two chat models on different lanes and one embedding model."""
    return SimulatorConfig(
        models=[
            ServedModel(name=CHAT_MODEL, max_model_len=32768),
            ServedModel(name=SMALL_MODEL, max_model_len=4096),
            ServedModel(name=EMBED_MODEL, max_model_len=256, kind="embed"),
        ],
        dev_mode=True,
        max_running=64,
    )


def fleet_settings(broker_url: str, redis_base: str, prefix: str, sim_url: str, security: SecuritySettings) -> Settings:
    """Short deadlines and heartbeats so fault tests run in seconds."""
    return Settings(
        broker_url=broker_url,
        result_backend=f"{redis_base}/{BACKEND_DB}",
        redis_url=f"{redis_base}/{STATE_DB}",
        key_prefix=prefix,
        instances={
            "sim-a": InstanceSettings(
                name="sim-a",
                base_url=sim_url + "/v1",
                concurrency=WORKER_CONCURRENCY,
                model_capabilities={EMBED_MODEL: ["embedding"], CHAT_MODEL: ["tools", "thinking"]},
            )
        },
        probe_localhost=False,
        timeouts=Timeouts(chat_s=10, stream_s=15, embed_s=5, management_s=5),
        lanes=LaneSettings(max_length=20, message_ttl_s=30, delivery_limit=3),
        security=security,
        heartbeat_interval_s=1.0,
        registry_ttl_s=5.0,
        retry_base_delay_s=0.05,
        retry_max_delay_s=0.2,
        stream_retention_s=60,
        result_expires_s=600,
        lease_s=2.0,
        redis_visibility_timeout_s=6.0,
    )


@dataclass
class Fleet:
    """What a test needs of the live fleet."""

    broker: str
    settings: Settings
    simulator: SimulatorServer
    state: redis.Redis
    worker: Any

    def reset_simulator(self) -> None:
        """Back to the session's simulator config, counters zeroed."""
        self.simulator.reset()


@pytest.fixture(scope="session")
def simulator() -> Iterator[SimulatorServer]:
    """One simulator for the whole session, reset by tests that change it."""
    with SimulatorServer(simulator_config()) as server:
        yield server


@pytest.fixture(scope="session")
def security() -> SecuritySettings:
    """This session's keys."""
    return fleet_security()


@pytest.fixture(scope="session", params=["redis", "rabbitmq"])
def fleet(
    request: pytest.FixtureRequest,
    redis_url: str,
    session_prefix: str,
    simulator: SimulatorServer,
    security: SecuritySettings,
) -> Iterator[Fleet]:
    """A configured app and an in-process worker on the given broker."""
    from tasks.app import configure, fleet_app
    from tasks.routing import invalidate_route_cache

    broker = request.param
    broker_url = request.getfixturevalue("rabbitmq_url") if broker == "rabbitmq" else f"{redis_url}/{BROKER_DB}"
    flush_test_databases(redis_url)
    prefix = f"{session_prefix}-{broker}"
    settings = fleet_settings(broker_url, redis_url, prefix, simulator.url, security)
    configure(settings)
    invalidate_route_cache()
    with start_worker(
        fleet_app(),  # the app itself, not the ``tasks.app.app`` proxy: the worker keeps the app it started with
        pool="threads",
        concurrency=WORKER_CONCURRENCY,
        perform_ping_check=False,
        shutdown_timeout=20.0,
        loglevel="WARNING",
    ) as worker:
        _wait_for_offerings(settings)
        yield Fleet(broker, settings, simulator, redis.Redis.from_url(settings.redis_url), worker)
    flush_test_databases(redis_url)


def _wait_for_offerings(settings: Settings, timeout_s: float = 20.0) -> None:
    from tasks.runtime import runtime

    wait_until(lambda: len(runtime().registry.all()) >= 3, timeout_s, "the worker registering its offerings")


@pytest.fixture(autouse=True)
def _fresh_simulator(request: pytest.FixtureRequest) -> None:
    """Tests that use the fleet start from the session's simulator config."""
    if "fleet" in request.fixturenames:
        sim: SimulatorServer = request.getfixturevalue("simulator")
        sim.reset()


class WorkerProcess:
    """A real ``celery worker`` in its own process, configured only through ``VLLM_FLEET_*`` variables."""

    def __init__(self, settings: Settings, name: str, *, concurrency: int = 4, loglevel: str = "WARNING") -> None:
        import os
        import subprocess
        import tempfile

        env = {**os.environ, **settings.to_env(), "PYTHONUNBUFFERED": "1"}
        self.name = name
        self._log = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 - a file, not a pipe: a chatty worker never blocks
        from tasks.cli import worker_process_argv

        self.process = subprocess.Popen(
            worker_process_argv(name, concurrency, loglevel),
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=self._log,
            text=True,
        )

    def logs(self) -> str:
        """Everything the worker wrote to stderr so far."""
        self._log.flush()
        self._log.seek(0)
        return self._log.read()

    def kill(self) -> None:
        """SIGKILL: no warm shutdown, no acks, nothing handed back."""
        self.process.kill()
        self.process.wait(timeout=10)

    def stop(self) -> None:
        """Warm shutdown (SIGTERM), then kill if it lingers."""
        import subprocess

        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()


wait_for = wait_until  # the name these tests have always used


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Deselect (not skip) the broker variants a test marked ``only_broker(name)`` does not apply to."""
    keep: list[pytest.Item] = []
    dropped: list[pytest.Item] = []
    for item in items:
        marker = item.get_closest_marker("only_broker")
        callspec = getattr(item, "callspec", None)
        broker = callspec.params.get("fleet", callspec.params.get("seam")) if callspec is not None else None
        (dropped if marker is not None and broker not in (None, marker.args[0]) else keep).append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = keep
