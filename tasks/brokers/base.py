"""The lane-broker interface, and the choice of an implementation from the broker URL."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, ClassVar, Protocol, TypeVar

from kombu import Queue
from redis import Redis

from provider.fleet.names import broker_is_amqp
from provider.fleet.redis_keys import RedisKeys
from provider.settings import Settings
from tasks.event_bus import EventBus, ReceivedEvent
from tasks.queues import CONTROL_QUEUE

__all__ = ["EventReader", "LaneBroker", "broker_for", "broker_is_amqp"]

T = TypeVar("T")


class EventReader(Protocol):
    """Registry events as they are published, from now on."""

    def read(self, timeout_s: float) -> list[ReceivedEvent]:
        """The events published since the last read (waits up to ``timeout_s`` for one)."""

    def close(self) -> None:
        """Release the connection."""


class LaneBroker(ABC):
    """Everything the fleet does differently on Redis and on RabbitMQ.

    ``bounds_lanes``: the broker refuses a publish to a full lane itself (else the producer checks the depth).
    ``dead_letters_rejected``: a message rejected without requeue is dead-lettered by the broker (else the
    worker copies it to the dead-letter queue). ``redelivers_unacked_after_visibility``: unacked messages come
    back after a visibility timeout, so a worker keeps touching the ones it holds.
    """

    kind: ClassVar[str]
    bounds_lanes: ClassVar[bool]
    dead_letters_rejected: ClassVar[bool]
    redelivers_unacked_after_visibility: ClassVar[bool]

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._lane_queues: dict[str, Queue] = {}

    def lane_queue(self, name: str) -> Queue:
        """The declaration of one lane (or management queue), the same in every process."""
        queue = self._lane_queues.get(name)
        if queue is None:
            queue = self._lane_queues[name] = self._declare_lane(name)
        return queue

    def control_queues(self) -> list[Queue]:
        """The queues every worker consumes before it knows its lanes (declared as lanes are, so on RabbitMQ
        Celery sees a quorum queue at start and turns off global QoS, which quorum queues refuse)."""
        return [self.lane_queue(CONTROL_QUEUE)]

    @abstractmethod
    def _declare_lane(self, name: str) -> Queue:
        """A fresh declaration of one lane."""

    @abstractmethod
    def dead_letter_queue(self) -> Queue:
        """The dead-letter queue's declaration."""

    @abstractmethod
    def declare_dead_letters(self, connection: Any) -> None:
        """Make sure the broker's own dead-lettering has a destination (a worker does this when it starts)."""

    @abstractmethod
    def lane_depth(self, lane: str, connection: Any = None) -> int:
        """Messages waiting in a lane (``connection``: a kombu connection, where the broker needs one)."""

    @abstractmethod
    def lane_consumers(self, lane: str, connection: Any) -> int | None:
        """How many consumers a lane has, or None when the broker cannot tell (ask the workers)."""

    @abstractmethod
    def touch_unacked(self, delivery_tags: list[str]) -> None:
        """Mark messages a live worker holds as just delivered (brokers with a visibility timeout)."""

    @abstractmethod
    def publish_options(self, options: dict[str, Any], timeout_s: float | None) -> None:
        """Adjust a publish's options for this broker (priority direction, per-message expiry)."""

    def publish(self, producer: Any, queue: Queue, task_id: str, send: Callable[[Any], T]) -> T:
        """Publish one request with ``send(producer)`` (``producer``: a kombu producer, acquired by the caller).

        A Redis lane is a list that ``LPUSH`` creates: nothing to check.
        """
        return send(producer)

    @abstractmethod
    def event_bus(self, redis_client: Redis, keys: RedisKeys, *, maxlen: int) -> EventBus:
        """Where a worker publishes registry events."""

    @abstractmethod
    def event_reader(self, redis_client: Redis, keys: RedisKeys) -> EventReader:
        """A reader of registry events published from now on (``open`` it before reading)."""


def broker_for(settings: Settings) -> LaneBroker:
    """The lane broker of ``settings.broker_url``: RabbitMQ for ``amqp://`` URLs, Redis otherwise."""
    from tasks.brokers.rabbitmq import RabbitMqLaneBroker
    from tasks.brokers.redis import RedisLaneBroker

    if broker_is_amqp(settings.broker_url):
        return RabbitMqLaneBroker(settings)
    return RedisLaneBroker(settings)
