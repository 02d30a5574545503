"""Registry events on RabbitMQ: the publishing bus (topic exchange ``llm.registry``) and a reader that binds a
temporary queue."""

from __future__ import annotations

import logging
import time
import uuid
from types import TracebackType
from typing import Any, Self

from kombu import Connection, Exchange, Producer, Queue

from provider.fleet.events import REGISTRY_EXCHANGE, REGISTRY_ROUTING_PREFIX, RegistryEvent
from tasks.event_bus_base import (
    ALL_REGISTRY_EVENTS,
    AMQP_CONNECT_TIMEOUT_S,
    AMQP_IO_TIMEOUT_S,
    CONTENT_TYPE,
    DEFAULT_QUEUE_SIZE,
    FAILURE_BACKOFF_S,
    NON_PERSISTENT,
    READER_POLL_S,
    BackgroundEventBus,
    OutgoingEvent,
    ReceivedEvent,
)

__all__ = ["AmqpEventBus", "AmqpEventReader"]

logger = logging.getLogger("tasks.event_bus")


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
