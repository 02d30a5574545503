"""Publishing registry events best-effort: a bounded queue and one background thread, so no caller ever waits.

``EventBus.publish`` accepts only :class:`~provider.fleet.events.RegistryEvent` objects. In the caller's thread it
runs the sanitizer of :mod:`provider.fleet.events` again (sections are plain dicts and could have been changed
after the event was built) and freezes the event into its JSON wire form; a refused event raises
:class:`~provider.fleet.events.RegistryEventError` there and is counted, and nothing is published. The frozen
form then goes on a bounded queue (full: dropped and counted) that a daemon thread drains to the transport.
Transport errors are swallowed, logged by class name only (a broker URL may hold credentials) and counted;
for ``failure_backoff_s`` after one, events fail at once without a try, so a dead broker never holds the
queue. Registry events are soft state (heartbeats repeat them): losing some beats delaying a worker.

Transports:

- :class:`RedisStreamEventBus`: ``XADD`` to one capped stream (``RedisKeys.events``), entries
  ``{routing_key, event}``; :func:`read_events` reads them back.
- :class:`AmqpEventBus`: topic exchange ``llm.registry``, routing key ``llm.registry.<event_type>``,
  non-persistent (delivery mode 1), the exchange declared once per connection, a short connect timeout;
  a connection found broken is replaced once per event; :class:`AmqpEventReader` binds a temporary queue.
- :class:`InMemoryEventBus`: keeps sanitized events in a list, for unit tests of code that publishes.

:func:`events_bus_for` picks AMQP for ``amqp://``/``amqps://``/``pyamqp://`` brokers, else the Redis stream.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Final, Self
from urllib.parse import urlsplit

import redis
from kombu import Connection, Exchange, Producer, Queue

from provider.fleet.events import REGISTRY_EXCHANGE, REGISTRY_ROUTING_PREFIX, RegistryEvent, RegistryEventError
from provider.fleet.redis_keys import RedisKeys

__all__ = [
    "AMQP_CONNECT_TIMEOUT_S",
    "DEFAULT_QUEUE_SIZE",
    "EVENTS_STREAM_MAX_LEN",
    "AmqpEventBus",
    "AmqpEventReader",
    "BackgroundEventBus",
    "EventBus",
    "EventBusStats",
    "InMemoryEventBus",
    "OutgoingEvent",
    "ReceivedEvent",
    "RedisStreamEventBus",
    "events_bus_for",
    "read_events",
]

logger = logging.getLogger(__name__)

DEFAULT_QUEUE_SIZE: Final = 1000
EVENTS_STREAM_MAX_LEN: Final = 10_000
AMQP_CONNECT_TIMEOUT_S: Final = 1.0
AMQP_IO_TIMEOUT_S: Final = 5.0
FAILURE_BACKOFF_S: Final = 5.0
CLOSE_TIMEOUT_S: Final = 2.0
READER_POLL_S: Final = 0.02
NON_PERSISTENT: Final = 1
CONTENT_TYPE: Final = "application/json"
AMQP_SCHEMES: Final = frozenset({"amqp", "amqps", "pyamqp"})
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


class RedisStreamEventBus(BackgroundEventBus):
    """Registry events on one capped Redis stream (for fleets whose broker is Redis)."""

    def __init__(
        self,
        redis_client: redis.Redis,
        key: str,
        maxlen: int = EVENTS_STREAM_MAX_LEN,
        *,
        approximate: bool = True,
        queue_size: int = DEFAULT_QUEUE_SIZE,
        failure_backoff_s: float = FAILURE_BACKOFF_S,
    ) -> None:
        if maxlen < 1:
            raise ValueError("maxlen must be at least 1")
        super().__init__(queue_size=queue_size, failure_backoff_s=failure_backoff_s)
        self._redis = redis_client
        self.key = key
        self.maxlen = maxlen
        self._approximate = approximate

    def _deliver(self, outgoing: OutgoingEvent) -> None:
        """One ``XADD`` with the cap."""
        self._redis.xadd(
            self.key,
            {"routing_key": outgoing.routing_key, "event": outgoing.body},
            maxlen=self.maxlen,
            approximate=self._approximate,
        )


class AmqpEventBus(BackgroundEventBus):
    """Registry events on the ``llm.registry`` topic exchange, not persistent."""

    def __init__(
        self,
        broker_url: str,
        *,
        exchange: str = REGISTRY_EXCHANGE,
        connect_timeout_s: float = AMQP_CONNECT_TIMEOUT_S,
        io_timeout_s: float = AMQP_IO_TIMEOUT_S,
        queue_size: int = DEFAULT_QUEUE_SIZE,
        failure_backoff_s: float = FAILURE_BACKOFF_S,
    ) -> None:
        super().__init__(queue_size=queue_size, failure_backoff_s=failure_backoff_s)
        self._broker_url = broker_url
        self.exchange_name = exchange
        self._connect_timeout_s = connect_timeout_s
        self._io_timeout_s = io_timeout_s
        self._connection: Connection | None = None
        self._producer: Producer | None = None
        self._exchange: Exchange | None = None

    def __repr__(self) -> str:
        return f"AmqpEventBus(exchange={self.exchange_name!r})"

    def _deliver(self, outgoing: OutgoingEvent) -> None:
        """Publish on the open connection; if it broke, once more on a new one."""
        fresh = self._producer is None
        try:
            self._publish(outgoing)
        except Exception:
            self._disconnect()
            if fresh:
                raise
            self._publish(outgoing)

    def _publish(self, outgoing: OutgoingEvent) -> None:
        """One publish, connecting first when needed."""
        producer = self._producer or self._connect()
        producer.publish(
            outgoing.body,
            exchange=self._exchange,
            routing_key=outgoing.routing_key,
            delivery_mode=NON_PERSISTENT,
            content_type=CONTENT_TYPE,
            content_encoding="utf-8",
            retry=False,
        )

    def _connect(self) -> Producer:
        """Connect within the connect timeout and declare the exchange."""
        connection = Connection(
            self._broker_url,
            connect_timeout=self._connect_timeout_s,
            transport_options={"read_timeout": self._io_timeout_s, "write_timeout": self._io_timeout_s},
        )
        try:
            connection.ensure_connection(max_retries=0)
            channel = connection.channel()
            exchange = _registry_exchange(self.exchange_name)(channel)
            exchange.declare()
            producer = Producer(channel, exchange=exchange, auto_declare=False)
        except Exception:
            _release(connection)
            raise
        self._connection, self._exchange, self._producer = connection, exchange, producer
        return producer

    def _after_fork(self) -> None:
        """The parent's socket is not ours to close: just forget it."""
        self._connection = self._producer = self._exchange = None

    def _disconnect(self) -> None:
        """Drop the connection; the next event connects (and declares) again."""
        connection, self._connection, self._producer, self._exchange = self._connection, None, None, None
        if connection is not None:
            _release(connection)


def _registry_exchange(name: str) -> Exchange:
    """The registry exchange as every publisher and reader declares it."""
    return Exchange(name, type="topic", durable=True, auto_delete=False)


def _release(connection: Connection) -> None:
    """Close a connection, ignoring a broker that is already gone."""
    try:
        connection.release()
    except Exception as exc:
        logger.debug("registry events: closing the connection failed (%s)", type(exc).__name__)


class AmqpEventReader:
    """A temporary queue bound to the registry exchange, for tests and the command line."""

    def __init__(
        self,
        broker_url: str,
        *,
        binding_key: str = ALL_REGISTRY_EVENTS,
        queue_name: str | None = None,
        exchange: str = REGISTRY_EXCHANGE,
        connect_timeout_s: float = AMQP_CONNECT_TIMEOUT_S,
    ) -> None:
        self._broker_url = broker_url
        self.binding_key = binding_key
        self.queue_name = queue_name or f"{REGISTRY_ROUTING_PREFIX}.reader.{uuid.uuid4().hex}"
        self.exchange_name = exchange
        self._connect_timeout_s = connect_timeout_s
        self._connection: Connection | None = None
        self._queue: Queue | None = None

    def open(self) -> None:
        """Connect, declare the exchange and an exclusive auto-delete queue, and bind it."""
        connection = Connection(self._broker_url, connect_timeout=self._connect_timeout_s)
        try:
            connection.ensure_connection(max_retries=0)
            channel = connection.channel()
            exchange = _registry_exchange(self.exchange_name)(channel)
            exchange.declare()
            bound = Queue(
                self.queue_name,
                exchange=exchange,
                routing_key=self.binding_key,
                durable=False,
                exclusive=True,
                auto_delete=True,
            )(channel)
            bound.declare()
        except Exception:
            _release(connection)
            raise
        self._connection, self._queue = connection, bound

    def get(self, timeout_s: float) -> ReceivedEvent | None:
        """The next event, or None if none arrives within ``timeout_s``."""
        if self._queue is None:
            raise RuntimeError("AmqpEventReader.open() first")
        deadline = time.monotonic() + timeout_s
        while True:
            message: Any = self._queue.get(no_ack=True)
            if message is not None:
                return ReceivedEvent(
                    event=RegistryEvent.from_json(message.body),
                    routing_key=str(message.delivery_info.get("routing_key", "")),
                    delivery_mode=message.properties.get("delivery_mode"),
                )
            if time.monotonic() >= deadline:
                return None
            time.sleep(READER_POLL_S)

    def drain(self, timeout_s: float) -> list[ReceivedEvent]:
        """Every event that arrives until none has come for ``timeout_s``."""
        events: list[ReceivedEvent] = []
        while (received := self.get(timeout_s)) is not None:
            events.append(received)
        return events

    def close(self) -> None:
        """Delete the queue and disconnect."""
        bound, connection, self._queue, self._connection = self._queue, self._connection, None, None
        if bound is not None:
            try:
                bound.delete()
            except Exception as exc:
                logger.debug("registry events: deleting the reader queue failed (%s)", type(exc).__name__)
        if connection is not None:
            _release(connection)

    def __enter__(self) -> Self:
        self.open()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()


def read_events(
    redis_client: redis.Redis,
    key: str,
    *,
    after: str = "0-0",
    count: int = 100,
    block_ms: int | None = None,
) -> list[ReceivedEvent]:
    """Events on the Redis stream after entry ``after`` (``"$"``: only new ones, with ``block_ms``).

    An entry that is not a valid registry event is skipped (and logged); pass the last ``entry_id`` as
    ``after`` to read on.
    """
    reply: Any = redis_client.xread({key: after}, count=count, block=block_ms)
    events: list[ReceivedEvent] = []
    for _stream, entries in reply or []:
        for entry_id, fields in entries:
            decoded = {_text(name): _text(value) for name, value in fields.items()}
            try:
                event = RegistryEvent.from_json(decoded.get("event", ""))
            except RegistryEventError as exc:
                logger.warning("registry events: skipping entry %s (%s)", _text(entry_id), exc)
                continue
            events.append(
                ReceivedEvent(event=event, routing_key=decoded.get("routing_key", ""), entry_id=_text(entry_id))
            )
    return events


def events_bus_for(
    broker_url: str,
    redis_client: redis.Redis,
    keys: RedisKeys,
    *,
    maxlen: int = EVENTS_STREAM_MAX_LEN,
    queue_size: int = DEFAULT_QUEUE_SIZE,
) -> BackgroundEventBus:
    """AMQP for an AMQP broker, else the Redis stream ``keys.events``."""
    scheme = urlsplit(broker_url).scheme.lower()
    if scheme in AMQP_SCHEMES:
        return AmqpEventBus(broker_url, queue_size=queue_size)
    return RedisStreamEventBus(redis_client, keys.events, maxlen, queue_size=queue_size)


def _text(value: object) -> str:
    """A Redis reply as text (clients may or may not decode responses)."""
    if isinstance(value, bytes):
        return value.decode("utf-8")
    return str(value)
