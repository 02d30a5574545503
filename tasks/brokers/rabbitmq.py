"""The RabbitMQ broker: quorum lanes that bound themselves (reject-publish), expire messages and dead-letter
what they cannot deliver; registry events on the ``llm.registry`` topic exchange."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, ClassVar, TypeVar

from kombu import Queue
from redis import Redis

from provider.fleet.redis_keys import RedisKeys
from provider.protocol.errors import NoFleetQueue
from tasks.brokers.base import EventReader, LaneBroker
from tasks.event_bus import ALL_REGISTRY_EVENTS, AmqpEventBus, AmqpEventReader, EventBus, ReceivedEvent
from tasks.queues import dead_letter_queue, lane_queue

__all__ = ["RabbitMqLaneBroker"]

T = TypeVar("T")
_RETURNS_KEPT = 4096


class _ReturnedMessages:
    """Ids of mandatory publishes the broker returned as unroutable (``basic.return``), kept until read.

    Registered as the channel's return handler: without one, py-amqp raises the return from inside the wait for
    the publish's confirmation, leaving that confirmation to be read by the channel's next publish.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ids: dict[str, None] = {}

    def __call__(self, exc: Exception, exchange: str, routing_key: str, message: Any) -> None:
        task_id = (getattr(message, "properties", None) or {}).get("correlation_id")
        if not isinstance(task_id, str):
            return
        with self._lock:
            self._ids[task_id] = None
            while len(self._ids) > _RETURNS_KEPT:  # returns nobody reads (another publisher's): forget the oldest
                self._ids.pop(next(iter(self._ids)))

    def take(self, task_id: str) -> bool:
        """Whether ``task_id`` was returned (forgetting it)."""
        with self._lock:
            if task_id not in self._ids:
                return False
            del self._ids[task_id]
            return True


_RETURNED = _ReturnedMessages()


class RabbitMqLaneBroker(LaneBroker):
    """A RabbitMQ broker (``amqp://``)."""

    kind: ClassVar[str] = "rabbitmq"
    bounds_lanes: ClassVar[bool] = True
    dead_letters_rejected: ClassVar[bool] = True
    redelivers_unacked_after_visibility: ClassVar[bool] = False

    def _declare_lane(self, name: str) -> Queue:
        return lane_queue(name, self.settings.lanes, True)

    def dead_letter_queue(self) -> Queue:
        """A durable quorum queue bound to the dead-letter exchange."""
        return dead_letter_queue(self.settings.lanes, True)

    def declare_dead_letters(self, connection: Any) -> None:
        """Declare the dead-letter exchange and queue, so RabbitMQ's own dead-lettering (TTL, delivery limit)
        never drops a message for want of a destination."""
        self.dead_letter_queue()(connection.default_channel).declare()

    def _declared(self, lane: str, connection: Any) -> Any:
        return connection.default_channel.queue_declare(lane, passive=True)

    def lane_depth(self, lane: str, connection: Any = None) -> int:
        """The lane's ready messages (a passive declare; needs ``connection``)."""
        if connection is None:
            raise ValueError("a RabbitMQ lane's depth is read through a connection")
        return int(self._declared(lane, connection).message_count)

    def lane_consumers(self, lane: str, connection: Any) -> int | None:
        """The lane's consumers, as RabbitMQ counts them."""
        return int(self._declared(lane, connection).consumer_count)

    def touch_unacked(self, delivery_tags: list[str]) -> None:
        """Nothing to do: RabbitMQ redelivers only a closed channel's unacked messages."""

    def publish_options(self, options: dict[str, Any], timeout_s: float | None) -> None:
        """A message TTL at the request's deadline (the lane's own TTL bounds the rest); mandatory routing, so a
        publish that reaches no queue comes back (``publish``) instead of being dropped."""
        if timeout_s:
            options.setdefault("expiration", timeout_s)
        options["mandatory"] = True

    def publish(self, producer: Any, queue: Queue, task_id: str, send: Callable[[Any], T]) -> T:
        """Publish; a request the broker returned as unroutable is published once more after declaring its lane.

        kombu declares a queue once per connection and remembers it: a lane deleted since (by an operator, or by
        ``x-expires``) would make every later publish vanish behind a positive confirmation. The declaration is
        idempotent, so declaring again and publishing again recovers; a second return is a typed error. The broker
        sends a return before its confirmation, so with ``confirm_publish`` (``celeryconfig``) it is known here.
        """
        channel = producer.channel
        channel.events["basic_return"].add(_RETURNED)
        result = send(producer)
        if not _RETURNED.take(task_id):
            return result
        queue(channel).declare()
        result = send(producer)
        if _RETURNED.take(task_id):
            raise NoFleetQueue(f"lane {queue.name} has no queue on the broker; the request was not published")
        return result

    def event_bus(self, redis_client: Redis, keys: RedisKeys, *, maxlen: int) -> EventBus:
        """The registry topic exchange (non-persistent, best effort)."""
        return AmqpEventBus(self.settings.broker_url)

    def event_reader(self, redis_client: Redis, keys: RedisKeys) -> EventReader:
        """A temporary queue bound to every registry event."""
        return _ExchangeReader(AmqpEventReader(self.settings.broker_url, binding_key=ALL_REGISTRY_EVENTS))


class _ExchangeReader:
    def __init__(self, reader: AmqpEventReader) -> None:
        self._reader = reader
        reader.open()

    def read(self, timeout_s: float) -> list[ReceivedEvent]:
        received = self._reader.get(timeout_s=timeout_s)
        return [] if received is None else [received]

    def close(self) -> None:
        self._reader.close()
