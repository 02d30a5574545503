"""The RabbitMQ broker: quorum lanes that bound themselves (reject-publish), expire messages and dead-letter
what they cannot deliver; registry events on the ``llm.registry`` topic exchange."""

from __future__ import annotations

from typing import Any, ClassVar

from kombu import Queue
from redis import Redis

from provider.fleet.redis_keys import RedisKeys
from tasks.brokers.base import EventReader, LaneBroker
from tasks.event_bus import ALL_REGISTRY_EVENTS, AmqpEventBus, AmqpEventReader, EventBus, ReceivedEvent
from tasks.queues import dead_letter_queue, lane_queue

__all__ = ["RabbitMqLaneBroker"]


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
        """A message TTL at the request's deadline (the lane's own TTL bounds the rest)."""
        if timeout_s:
            options.setdefault("expiration", timeout_s)

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
