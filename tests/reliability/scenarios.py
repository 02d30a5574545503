"""Shared steps of the fault scenarios: bring up a fleet on a given broker, submit calls, count the outcome."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from provider.protocol import FleetError
from provider.settings import SecuritySettings, Settings
from tests.conftest import BACKEND_DB, STATE_DB, flush_test_databases
from tests.reliability.conftest import use, wait_for_offerings
from tests.reliability.harness import (
    CHAT_MODEL,
    CountingSimulator,
    Tally,
    Worker,
    collect,
    fault_settings,
    simulator_config,
)


@dataclass
class Stage:
    """A running scenario fleet."""

    settings: Settings
    sims: dict[str, CountingSimulator]
    workers: list[Worker] = field(default_factory=list)

    def add_worker(
        self, name: str, concurrency: int, settings: Settings | None = None, *, processes: int = 1
    ) -> Worker:
        worker = Worker(settings or self.settings, name, concurrency=concurrency, processes=processes)
        self.workers.append(worker)
        return worker


@contextmanager
def stage(
    redis_url: str,
    broker_url: str,
    security: SecuritySettings,
    *,
    sims: dict[str, dict[str, Any]] | None = None,
    concurrency: int = 32,
    workers: int = 1,
    worker_per_instance: bool = False,
    processes: int = 1,
    **overrides: Any,
) -> Iterator[Stage]:
    """Simulators (name -> config overrides), settings serving them all, and ``workers`` workers (each of
    ``processes`` processes: ``vllm-fleet worker --processes``)."""
    flush_test_databases(redis_url)
    started: dict[str, CountingSimulator] = {}
    running: Stage | None = None
    try:
        for name, config in (sims or {"sim-a": {}}).items():
            sim = CountingSimulator(simulator_config(**config))
            sim.start()
            started[name] = sim
        settings = fault_settings(
            broker_url=broker_url,
            backend_url=f"{redis_url}/{BACKEND_DB}",
            state_url=f"{redis_url}/{STATE_DB}",
            prefix=f"rel-{uuid.uuid4().hex[:8]}",
            security=security,
            instances={name: sim.url for name, sim in started.items()},
            concurrency=concurrency,
            **overrides,
        )
        use(settings)
        running = Stage(settings, started)
        if worker_per_instance:  # one worker beside each instance, as on GPU hosts
            for name, instance in settings.instances.items():
                own = settings.model_copy(update={"instances": {name: instance}})
                running.add_worker(f"w-{name}", concurrency + 2, own)
        else:
            for index in range(workers):
                running.add_worker(f"w{index}", concurrency + 2, processes=processes)
        wait_for_offerings(settings, 2 * len(started))
        yield running
    finally:
        for worker in running.workers if running is not None else []:
            worker.stop()
        for sim in started.values():
            sim.stop()
        flush_test_databases(redis_url)


class Calls:
    """Submit chats from a thread pool; remember each one's deadline; count what each became."""

    def __init__(self, tally: Tally, pool_size: int) -> None:
        self.tally = tally
        self.pool = ThreadPoolExecutor(max_workers=pool_size, thread_name_prefix="caller")
        self.futures: dict[str, tuple[Future[Any], float]] = {}
        self.prompts: list[str] = []

    def chat(self, timeout_s: float, *, prefix: str = "", **params: Any) -> str:
        from tasks import chat

        prompt = f"{uuid.uuid4().hex[:10]} {prefix}".strip()

        def call() -> Any:
            started = time.monotonic()
            reply = chat.delay(
                model=CHAT_MODEL,
                messages=[{"role": "user", "content": prompt}],
                max_tokens=params.pop("max_tokens", 4),
                timeout_s=timeout_s,
                **params,
            ).get()
            self.tally.latencies_s.append(time.monotonic() - started)
            return reply

        self.futures[prompt] = (self.pool.submit(call), time.time() + timeout_s)
        self.prompts.append(prompt)
        self.tally.submitted += 1
        return prompt

    def collect(self, margin_s: float = 5.0, check: Callable[[str, Any], bool] | None = None) -> None:
        collect(self.tally, self.futures, margin_s, check or answers)
        self.pool.shutdown(wait=False, cancel_futures=True)


def answers(prompt: str, reply: Any) -> bool:
    """The simulator echoes the prompt (cut to the token budget): the answer is this request's own."""
    content = str(reply.get("content") or "").strip()
    return bool(content) and prompt.startswith(content)


def typed_only(tally: Tally) -> bool:
    """No caller saw a raw exception."""
    return not any(code.startswith("untyped:") for code in tally.errors)


def is_fleet_error(exc: BaseException) -> bool:
    return isinstance(exc, FleetError)
