"""Settings and start-up of the fleet under test: one worker process beside one simulator.

The benchmark owns three Redis databases (broker, results, shared state: 13, 14 and 15 unless
``VFT_BENCH_DBS`` names others, e.g. ``VFT_BENCH_DBS=40,41,42``), a key prefix per worker start, and the
RabbitMQ vhost ``vllm-fleet-bench``; nothing else on the servers is touched. It flushes its databases.
"""

from __future__ import annotations

import os
import time
import uuid
from dataclasses import dataclass
from typing import Any

from bench.procs import Managed, start_worker
from provider.protocol import generated_security
from provider.settings import InstanceSettings, LaneSettings, SecuritySettings, Settings, Timeouts
from provider.vllm.models import ChatRequest

__all__ = [
    "BACKEND_DB",
    "BROKER_DB",
    "INSTANCE",
    "REDIS_BASE",
    "STATE_DB",
    "VHOST",
    "FleetUnderTest",
    "bench_databases",
    "bench_security",
    "bench_settings",
    "chat_messages",
    "chat_request",
    "start_fleet",
    "worker_env",
]

REDIS_BASE = "redis://127.0.0.1:6379"
DEFAULT_DBS = (13, 14, 15)


def bench_databases(text: str | None = None) -> tuple[int, int, int]:
    """The broker, results and state databases: ``VFT_BENCH_DBS`` ("a,b,c", three distinct numbers) or 13,14,15."""
    text = os.environ.get("VFT_BENCH_DBS", "") if text is None else text
    if not text.strip():
        return DEFAULT_DBS
    try:
        numbers = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise ValueError(f"VFT_BENCH_DBS={text!r}: expected three database numbers, e.g. 40,41,42") from None
    if len(numbers) != 3 or len(set(numbers)) != 3 or min(numbers) < 0:
        raise ValueError(f"VFT_BENCH_DBS={text!r}: expected three distinct database numbers, e.g. 40,41,42")
    return numbers[0], numbers[1], numbers[2]


BROKER_DB, BACKEND_DB, STATE_DB = bench_databases()
VHOST = "vllm-fleet-bench"
INSTANCE = "bench-sim"
READY_TIMEOUT_S = 60.0
MAX_TOKENS = 64


def bench_security() -> SecuritySettings:
    """Fresh Ed25519 signing and AES-256-GCM sealing keys: the defaults (signed and encrypted)."""
    return generated_security(kid="bench-k1", encryption_kid="bench-e1")


def bench_settings(
    broker_url: str,
    sim_url: str,
    security: SecuritySettings,
    *,
    concurrency: int,
    max_length: int = 5000,
    chat_s: float = 60.0,
    stream_s: float = 120.0,
    registry_ttl_s: float = 90.0,
) -> Settings:
    """One instance (the simulator) with ``concurrency`` slots, under a fresh key prefix."""
    return Settings(
        broker_url=broker_url,
        result_backend=f"{REDIS_BASE}/{BACKEND_DB}",
        redis_url=f"{REDIS_BASE}/{STATE_DB}",
        key_prefix=f"vfb-{uuid.uuid4().hex[:8]}",
        instances={INSTANCE: InstanceSettings(name=INSTANCE, base_url=sim_url, concurrency=concurrency)},
        probe_localhost=False,
        timeouts=Timeouts(chat_s=chat_s, stream_s=stream_s, embed_s=10, management_s=10),
        lanes=LaneSettings(max_length=max_length, message_ttl_s=max(chat_s, stream_s) + 60),
        security=security,
        registry_ttl_s=registry_ttl_s,
        stream_retention_s=300,
        result_expires_s=3600,
    )


def chat_messages(index: int) -> list[dict[str, Any]]:
    """The benchmark's prompt number ``index`` (a few distinct prompts, each with a known answer)."""
    return [{"role": "user", "content": f"benchmark prompt number {index}"}]


def chat_request(model: str, index: int, max_tokens: int = MAX_TOKENS) -> ChatRequest:
    """The direct client's request for prompt ``index``."""
    return ChatRequest(model=model, messages=chat_messages(index), max_tokens=max_tokens)


@dataclass
class FleetUnderTest:
    """A running worker and the settings its producers use."""

    settings: Settings
    worker: Managed
    concurrency: int

    def stop(self) -> None:
        """Warm shutdown of the worker (killed if it lingers)."""
        self.worker.stop()


def worker_env(settings: Settings) -> dict[str, str]:
    """``settings`` as ``VLLM_FLEET_*`` variables; unset optional fields are left out rather than sent as null."""
    return {name: value for name, value in settings.to_env().items() if value != "null"}


def configure_producer(settings: Settings) -> None:
    """Point this process's producer API at ``settings``."""
    from tasks import configure
    from tasks.routing import invalidate_route_cache

    configure(settings)
    invalidate_route_cache()


def wait_for_offerings(settings: Settings, models: list[str], worker: Managed | None = None) -> None:
    """Wait until the registry lists an offering for every model."""
    from tasks.routing import invalidate_route_cache
    from tasks.runtime import runtime

    deadline = time.monotonic() + READY_TIMEOUT_S
    wanted = set(models)
    while time.monotonic() < deadline:
        if worker is not None and not worker.alive():
            raise RuntimeError(f"worker {worker.name} exited: {worker.log_tail()}")
        served = {o.model for o in runtime().registry.all()}
        if wanted <= served:
            invalidate_route_cache()
            return
        time.sleep(0.05)
    tail = worker.log_tail() if worker is not None else ""
    raise RuntimeError(f"the worker did not register {sorted(wanted)} in time: {tail}")


def start_fleet(
    settings: Settings,
    models: list[str],
    *,
    name: str,
    concurrency: int,
    warm_up: bool = True,
    processes: int = 1,
) -> FleetUnderTest:
    """Start a worker for ``settings`` (``processes`` sharing its slots), wait for its offerings, and
    (optionally) one round trip per model."""
    from tasks import chat

    configure_producer(settings)
    worker = start_worker(worker_env(settings), name, concurrency, processes)
    fleet = FleetUnderTest(settings, worker, concurrency)
    try:
        wait_for_offerings(settings, models, worker)
        if warm_up:
            for model in models:
                chat.delay(model=model, messages=chat_messages(0), max_tokens=MAX_TOKENS).get(timeout=30)
    except BaseException:
        fleet.stop()
        raise
    return fleet
