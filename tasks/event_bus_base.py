"""The event bus contract and its best-effort engine: a bounded queue and one background thread per bus, so
no caller ever waits; transports subclass ``BackgroundEventBus`` and deliver one frozen event at a time."""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from types import TracebackType
from typing import Final, Self

from provider.fleet.events import REGISTRY_ROUTING_PREFIX, RegistryEvent, RegistryEventError

__all__ = [
    "BackgroundEventBus",
    "EventBus",
    "EventBusStats",
    "InMemoryEventBus",
    "OutgoingEvent",
    "ReceivedEvent",
]

logger = logging.getLogger("tasks.event_bus")

DEFAULT_QUEUE_SIZE: Final = 1000
EVENTS_STREAM_MAX_LEN: Final = 10_000
AMQP_CONNECT_TIMEOUT_S: Final = 1.0
AMQP_IO_TIMEOUT_S: Final = 5.0
FAILURE_BACKOFF_S: Final = 5.0
CLOSE_TIMEOUT_S: Final = 2.0
READER_POLL_S: Final = 0.02
NON_PERSISTENT: Final = 1
CONTENT_TYPE: Final = "application/json"
ALL_REGISTRY_EVENTS: Final = f"{REGISTRY_ROUTING_PREFIX}.#"


@dataclass(frozen=True, slots=True)
class EventBusStats:
    """Counters of one bus since it was made."""

    published: int = 0
    dropped: int = 0
    failed: int = 0
    refused: int = 0
    pending: int = 0


@dataclass(frozen=True, slots=True)
class ReceivedEvent:
    """An event read back from a transport, with how it travelled."""

    event: RegistryEvent
    routing_key: str
    entry_id: str | None = None
    delivery_mode: int | None = None


@dataclass(frozen=True, slots=True)
class OutgoingEvent:
    """An event frozen into its wire form in the caller's thread."""

    routing_key: str
    body: str


def _prepare(event: RegistryEvent) -> tuple[RegistryEvent, OutgoingEvent]:
    """The event sanitized again and frozen to JSON; raises TypeError or RegistryEventError when refused."""
    if not isinstance(event, RegistryEvent):
        raise TypeError(f"an event bus publishes RegistryEvent objects, not {type(event).__name__}")
    checked = RegistryEvent.from_dict(event.to_dict())
    return checked, OutgoingEvent(routing_key=checked.routing_key, body=checked.to_json())


class EventBus(ABC):
    """Where registry events go; ``publish`` never waits on a transport."""

    @abstractmethod
    def publish(self, event: RegistryEvent) -> None:
        """Send ``event`` best-effort; a refused event raises ``TypeError`` or ``RegistryEventError``."""

    @abstractmethod
    def stats(self) -> EventBusStats:
        """The counters so far."""

    def flush(self, timeout_s: float = CLOSE_TIMEOUT_S) -> bool:
        """Wait until queued events are handed to the transport (or failed); False on timeout."""
        return True

    def close(self, timeout_s: float = CLOSE_TIMEOUT_S) -> None:
        """Deliver what is queued (within ``timeout_s``) and release the transport."""
        self.flush(timeout_s)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()


class InMemoryEventBus(EventBus):
    """Keeps sanitized events in ``received``: the stub for tests of code that publishes."""

    def __init__(self) -> None:
        self.received: list[ReceivedEvent] = []
        self._refused = 0

    def publish(self, event: RegistryEvent) -> None:
        """Sanitize and keep the event."""
        try:
            checked, outgoing = _prepare(event)
        except (TypeError, RegistryEventError):
            self._refused += 1
            raise
        self.received.append(ReceivedEvent(event=checked, routing_key=outgoing.routing_key))

    def stats(self) -> EventBusStats:
        """Everything kept counts as published."""
        return EventBusStats(published=len(self.received), refused=self._refused)


class BackgroundEventBus(EventBus):
    """The queue and thread behind every real transport; subclasses implement ``_deliver``."""

    def __init__(self, *, queue_size: int = DEFAULT_QUEUE_SIZE, failure_backoff_s: float = FAILURE_BACKOFF_S) -> None:
        if queue_size < 1:
            raise ValueError("queue_size must be at least 1")
        self._queue_size = queue_size
        self._failure_backoff_s = failure_backoff_s
        self._retry_at = 0.0
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._queue: queue.Queue[OutgoingEvent | None] = queue.Queue(queue_size)
        self._thread: threading.Thread | None = None
        self._pid = os.getpid()
        self._closed = False
        self._pending = 0
        self._published = 0
        self._dropped = 0
        self._failed = 0
        self._refused = 0
        self._failing = False

    @abstractmethod
    def _deliver(self, outgoing: OutgoingEvent) -> None:
        """Hand one event to the transport (background thread only); raise on failure."""

    def _disconnect(self) -> None:
        """Release the transport's connection (background thread only)."""

    def _after_fork(self) -> None:
        """Forget, without closing, a connection inherited from the parent process."""

    def publish(self, event: RegistryEvent) -> None:
        """Sanitize and freeze the event here, then queue it; never waits on the transport."""
        try:
            _, outgoing = _prepare(event)
        except (TypeError, RegistryEventError):
            with self._lock:
                self._refused += 1
            raise
        self._ensure_thread()
        with self._lock:
            if self._closed:
                self._dropped += 1
                return
            try:
                self._queue.put_nowait(outgoing)
            except queue.Full:
                self._dropped += 1
                return
            self._pending += 1

    def stats(self) -> EventBusStats:
        """The counters so far."""
        with self._lock:
            return EventBusStats(
                published=self._published,
                dropped=self._dropped,
                failed=self._failed,
                refused=self._refused,
                pending=self._pending,
            )

    def flush(self, timeout_s: float = CLOSE_TIMEOUT_S) -> bool:
        """Wait until every queued event was delivered or failed; False if ``timeout_s`` ran out first."""
        with self._idle:
            return self._idle.wait_for(lambda: self._pending == 0, timeout_s)

    def close(self, timeout_s: float = CLOSE_TIMEOUT_S) -> None:
        """Stop taking events, deliver the queued ones within ``timeout_s``, then disconnect."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            thread = self._thread if self._pid == os.getpid() else None
        if thread is None or not thread.is_alive():
            return
        deadline = time.monotonic() + timeout_s
        try:
            self._queue.put(None, timeout=timeout_s)
        except queue.Full:
            return
        thread.join(max(0.0, deadline - time.monotonic()))

    def _ensure_thread(self) -> None:
        """Start the sender on first use, and again in a forked child (threads do not survive a fork)."""
        thread = self._thread
        if thread is not None and self._pid == os.getpid() and thread.is_alive():
            return
        if self._pid != os.getpid():
            # A forked child: the parent's lock, queue, thread, counters and connection are not ours.
            self._lock = threading.Lock()
            self._idle = threading.Condition(self._lock)
            self._queue = queue.Queue(self._queue_size)
            self._pending = self._published = self._dropped = self._failed = self._refused = 0
            self._retry_at = 0.0
            self._thread = None
            self._pid = os.getpid()
            self._after_fork()
        with self._lock:
            if self._closed or (self._thread is not None and self._thread.is_alive()):
                return
            self._thread = threading.Thread(
                target=self._run, args=(self._queue,), name=f"{type(self).__name__}-sender", daemon=True
            )
            self._thread.start()

    def _run(self, outbox: queue.Queue[OutgoingEvent | None]) -> None:
        """Drain the queue into the transport until the stop sentinel."""
        while True:
            outgoing = outbox.get()
            if outgoing is None:
                break
            if time.monotonic() < self._retry_at:
                self._note_failure(None)  # backing off: a dead transport must not hold the queue
                continue
            try:
                self._deliver(outgoing)
            except Exception as exc:  # best-effort: a broken transport must never reach the caller
                self._retry_at = time.monotonic() + self._failure_backoff_s
                self._note_failure(exc)
            else:
                self._note_success()
        try:
            self._disconnect()
        except Exception as exc:
            logger.debug("registry events: disconnect failed (%s)", type(exc).__name__)

    def _note_success(self) -> None:
        with self._idle:
            self._published += 1
            self._pending -= 1
            recovered, self._failing = self._failing, False
            self._idle.notify_all()
        if recovered:
            logger.info("registry events: %s delivers again", type(self).__name__)

    def _note_failure(self, exc: Exception | None) -> None:
        with self._idle:
            self._failed += 1
            self._pending -= 1
            first, self._failing = not self._failing, True
            self._idle.notify_all()
        if first and exc is not None:
            # The class name only: transport messages can carry the broker URL.
            logger.warning("registry events: %s cannot publish (%s)", type(self).__name__, type(exc).__name__)
