"""The simulated engine's state: the running/waiting scheduler, sleep mode, failure rules and the counters.

Everything runs on the server's one event loop, so plain integers hold the counts. A request is a
``Ticket``: ``admit`` puts it in flight and either starts it (a free running slot) or queues it; ``finish``
releases whatever it holds exactly once, whichever way the request ends.
"""

from __future__ import annotations

import asyncio
import time
import zlib
from collections import deque
from typing import Any, Literal

from simulator.config import FailureRule, ServedModel, SimulatorConfig
from simulator.metrics import ModelLoad

__all__ = ["DRAIN_POLL_S", "Engine", "Outcome", "QueueFullError", "Ticket"]

DRAIN_POLL_S = 0.01
SLEEP_TAGS = frozenset({"weights", "kv_cache"})

Outcome = Literal["completed", "aborted", "failed", "rejected"]

_NEW, _ENTERED, _WAITING, _RUNNING, _DROPPED, _DONE = range(6)


class QueueFullError(Exception):
    """The waiting queue holds ``max_queued`` requests already."""


class Ticket:
    """One generation or embedding request as the engine sees it."""

    __slots__ = (
        "arrived",
        "epoch",
        "first_token",
        "future",
        "generated",
        "load",
        "period",
        "prompt_tokens",
        "reserved_tokens",
        "state",
    )

    def __init__(self, load: ModelLoad, prompt_tokens: int, reserved_tokens: int, period: int = 0) -> None:
        self.load = load
        self.period = period
        self.prompt_tokens = prompt_tokens
        self.reserved_tokens = reserved_tokens
        self.arrived = time.monotonic()
        self.first_token = False
        self.generated = 0
        self.epoch = 0
        self.future: asyncio.Future[bool] | None = None
        self.state = _NEW


class Engine:
    """The scheduler, sleep state, failure rules and statistics of one simulated server."""

    def __init__(self, config: SimulatorConfig) -> None:
        self.initial_config = config.model_copy(deep=True)
        self.config = config
        self.fingerprint = ""
        self._set_fingerprint()
        self.in_flight = 0
        self.running = 0
        self.waiting = 0
        self.loads: dict[str, ModelLoad] = {}
        self._queue: deque[Ticket] = deque()
        self.epoch = 0
        self.sleeping = False
        self._asleep_tags: set[str] = set()
        self.paused = False
        self.resumed = asyncio.Event()
        self.resumed.set()
        self.counting_period = -1
        self._zero_counters()

    def _zero_counters(self) -> None:
        """Start the cumulative statistics afresh (live gauges stay as they are).

        Requests issued before this moment still release what they hold when they end, but their
        outcomes belong to the previous counting period and are not counted in the new one.
        """
        self.counting_period += 1
        self.requests: dict[str, int] = {}
        self.completed = 0
        self.aborted = 0
        self.failed = 0
        self.rejected = 0
        self.max_in_flight_seen = self.in_flight
        self.max_running_seen = self.running
        self.last_request_headers: dict[str, str] = {}
        self.last_bodies: dict[str, Any] = {}

    def _set_fingerprint(self) -> None:
        """vLLM's ``system_fingerprint``: the version and a short hash of the served setup."""
        names = ",".join(model.name for model in self.config.models)
        self.fingerprint = f"vllm-{self.config.version}-{zlib.crc32(names.encode()):08x}"

    # ---- configuration and statistics ----

    def replace_config(self, config: SimulatorConfig) -> None:
        """Serve with ``config`` from now on (requests in flight keep their plans)."""
        self.config = config
        self._set_fingerprint()
        self._dispatch()

    def reset(self) -> None:
        """Back to the start configuration, awake, with the cumulative counters zeroed."""
        self.replace_config(self.initial_config.model_copy(deep=True))
        for name, load in list(self.loads.items()):
            fresh = ModelLoad()
            fresh.running, fresh.waiting, fresh.kv_tokens = load.running, load.waiting, load.kv_tokens
            self.loads[name] = fresh
        self._zero_counters()
        self.wake_up(None)

    def count_request(self, route: str) -> None:
        """Note one request on ``route``."""
        self.requests[route] = self.requests.get(route, 0) + 1

    def stats(self) -> dict[str, Any]:
        """The counters ``GET /_sim/stats`` reports."""
        return {
            "requests": dict(self.requests),
            "completed": self.completed,
            "aborted": self.aborted,
            "failed": self.failed,
            "rejected": self.rejected,
            "in_flight": self.in_flight,
            "running": self.running,
            "waiting": self.waiting,
            "max_in_flight_seen": self.max_in_flight_seen,
            "max_running_seen": self.max_running_seen,
            "sleeping": self.sleeping,
            "last_request_headers": self.last_request_headers,
            "last_chat_body": self.last_bodies.get("chat"),
            "last_bodies": self.last_bodies,
        }

    def take_failure(self, route: str, model: str | None) -> FailureRule | None:
        """The first failure rule that hits this request, with one use consumed."""
        for rule in self.config.failures:
            if rule.matches(route, model):
                if rule.count > 0:
                    rule.count -= 1
                return rule
        return None

    # ---- load ----

    def load_for(self, model: ServedModel) -> ModelLoad:
        """The load record of the engine that serves ``model`` (its base model)."""
        name = self.config.base_of(model).name
        load = self.loads.get(name)
        if load is None:
            load = self.loads[name] = ModelLoad()
        return load

    def ticket(self, model: ServedModel, prompt_tokens: int, output_tokens: int) -> Ticket:
        """A new request for ``model`` (not yet in flight)."""
        return Ticket(self.load_for(model), prompt_tokens, prompt_tokens + output_tokens, self.counting_period)

    def enter(self, ticket: Ticket) -> None:
        """Count ``ticket`` as in flight (accepted, not yet scheduled)."""
        if ticket.state != _NEW:
            return
        ticket.state = _ENTERED
        ticket.epoch = self.epoch
        self.in_flight += 1
        self.max_in_flight_seen = max(self.max_in_flight_seen, self.in_flight)

    def admit(self, ticket: Ticket) -> None:
        """Put ``ticket`` in flight and start it, or queue it; QueueFullError when the queue is at its cap."""
        must_wait = self.sleeping or self._queue_blocked()
        max_queued = self.config.max_queued
        if must_wait and max_queued and self.waiting >= max_queued:
            raise QueueFullError
        self.enter(ticket)
        if not must_wait:
            self._start(ticket)
            return
        ticket.state = _WAITING
        ticket.future = asyncio.get_running_loop().create_future()
        self.waiting += 1
        ticket.load.waiting += 1
        self._queue.append(ticket)

    def _queue_blocked(self) -> bool:
        """Whether a new request must wait behind others or for a running slot."""
        return bool(self._queue) or self.running >= self.config.max_running

    def _start(self, ticket: Ticket) -> None:
        """Give ``ticket`` a running slot."""
        ticket.state = _RUNNING
        self.running += 1
        self.max_running_seen = max(self.max_running_seen, self.running)
        load = ticket.load
        load.running += 1
        load.kv_tokens += ticket.reserved_tokens
        load.queue_time.observe(time.monotonic() - ticket.arrived)

    def _dispatch(self) -> None:
        """Start queued requests while running slots are free and the engine is awake."""
        queue = self._queue
        while queue and not self.sleeping and self.running < self.config.max_running:
            ticket = queue.popleft()
            if ticket.state != _WAITING:
                continue
            self.waiting -= 1
            ticket.load.waiting -= 1
            self._start(ticket)
            if ticket.future is not None and not ticket.future.done():
                ticket.future.set_result(True)

    def first_token(self, ticket: Ticket) -> None:
        """Note the end of prefill: the time to first token and the prompt tokens processed."""
        if ticket.first_token:
            return
        ticket.first_token = True
        ticket.load.ttft.observe(time.monotonic() - ticket.arrived)
        ticket.load.prompt_tokens += ticket.prompt_tokens

    def finish(self, ticket: Ticket, outcome: Outcome, finish_reason: str | None = None) -> None:
        """Release what ``ticket`` holds and count how it ended; later calls do nothing."""
        state = ticket.state
        if state == _DONE:
            return
        ticket.state = _DONE
        load = ticket.load
        if state == _WAITING:
            self.waiting -= 1
            load.waiting -= 1
        elif state == _RUNNING:
            self.running -= 1
            load.running -= 1
            load.kv_tokens -= ticket.reserved_tokens
        if state != _NEW:
            self.in_flight -= 1
        if ticket.period == self.counting_period:
            self._count_outcome(outcome)
        load.generation_tokens += ticket.generated
        if finish_reason is not None:
            reason = "stop" if finish_reason == "tool_calls" else finish_reason
            load.finished[reason] = load.finished.get(reason, 0) + 1
            load.e2e.observe(time.monotonic() - ticket.arrived)
        if state == _RUNNING:
            self._dispatch()

    def _count_outcome(self, outcome: Outcome) -> None:
        if outcome == "completed":
            self.completed += 1
        elif outcome == "aborted":
            self.aborted += 1
        elif outcome == "failed":
            self.failed += 1
        else:
            self.rejected += 1

    # ---- sleep mode ----

    async def sleep(self, mode: str) -> None:
        """Sleep: new requests queue until ``wake_up``; running ones are aborted, drained or paused."""
        self.sleeping = True
        self._asleep_tags = set(SLEEP_TAGS)
        if mode == "abort":
            self.epoch += 1
            while self._queue:
                ticket = self._queue.popleft()
                if ticket.state != _WAITING:
                    continue
                ticket.state = _DROPPED
                self.waiting -= 1
                ticket.load.waiting -= 1
                if ticket.future is not None and not ticket.future.done():
                    ticket.future.set_result(False)
        elif mode == "keep":
            self.paused = True
            self.resumed.clear()
        else:
            while self.running:
                await asyncio.sleep(DRAIN_POLL_S)

    def wake_up(self, tags: list[str] | None) -> None:
        """Wake the given parts (all when None); the engine runs again once every part is awake."""
        if tags is None:
            self._asleep_tags.clear()
        else:
            self._asleep_tags.difference_update(tags)
        if self._asleep_tags:
            return
        self.sleeping = False
        self.paused = False
        self.resumed.set()
        self._dispatch()
