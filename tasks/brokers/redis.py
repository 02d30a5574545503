"""The Redis broker: plain kombu lists, bounded by the producer; the worker copies dead letters itself."""

from __future__ import annotations

import time
from functools import cached_property
from typing import Any, ClassVar

from kombu import Queue
from redis import Redis

from provider.fleet.redis_keys import RedisKeys
from tasks.brokers.base import EventReader, LaneBroker
from tasks.event_bus import EventBus, ReceivedEvent, RedisStreamEventBus, read_events
from tasks.queues import dead_letter_queue, lane_queue

__all__ = ["RedisLaneBroker"]


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


_KOMBU_PRIORITY_SEP = "\x06\x16"
_KOMBU_PRIORITY_STEPS = (3, 6, 9)
_BROKER_CHECK_TIMEOUT_S = 1.0
# kombu's Redis transport pops priority 0 first; Celery's convention is the opposite (9 is the highest).
_REDIS_LOWEST_PRIORITY = 9
_UNACKED_INDEX_KEY = "unacked_index"  # kombu's Redis transport default (transport option unacked_index_key)
_EVENTS_BATCH = 100


def _priority_lists(lane: str) -> list[str]:
    """kombu's Redis lists for one queue: the plain name for priority 0, a suffixed one per other step."""
    return [lane, *(f"{lane}{_KOMBU_PRIORITY_SEP}{step}" for step in _KOMBU_PRIORITY_STEPS)]


class RedisLaneBroker(LaneBroker):
    """A Redis broker: kombu honours no queue arguments, so lanes are plain lists and the deadline in every
    envelope replaces a TTL."""

    kind: ClassVar[str] = "redis"
    bounds_lanes: ClassVar[bool] = False
    dead_letters_rejected: ClassVar[bool] = False
    redelivers_unacked_after_visibility: ClassVar[bool] = True

    def _declare_lane(self, name: str) -> Queue:
        return lane_queue(name, self.settings.lanes, False)

    def dead_letter_queue(self) -> Queue:
        """A plain list the worker copies dead letters into."""
        return dead_letter_queue(self.settings.lanes, False)

    def declare_dead_letters(self, connection: Any) -> None:
        """Nothing to declare: a Redis list exists once something is pushed."""

    @cached_property
    def client(self) -> Redis:
        """The broker itself: short timeouts, so an outage fails fast."""
        return Redis.from_url(
            self.settings.broker_url,
            socket_connect_timeout=_BROKER_CHECK_TIMEOUT_S,
            socket_timeout=_BROKER_CHECK_TIMEOUT_S,
        )

    def lane_depth(self, lane: str, connection: Any = None) -> int:
        """Messages waiting in a lane, over kombu's per-priority lists."""
        pipe = self.client.pipeline(transaction=False)
        for key in _priority_lists(lane):
            pipe.llen(key)
        return int(sum(pipe.execute()))

    def lane_consumers(self, lane: str, connection: Any) -> int | None:
        """Redis cannot tell: the workers are asked instead."""
        return None

    def publish_options(self, options: dict[str, Any], timeout_s: float | None) -> None:
        """Invert the priority for kombu's Redis transport; expiry is the deadline's (``expires``) alone."""
        options["priority"] = _REDIS_LOWEST_PRIORITY - int(options.get("priority", 5))

    def touch_unacked(self, delivery_tags: list[str]) -> None:
        """Mark messages a live worker holds as just delivered (``ZADD XX`` never re-adds an acked one)."""
        now = time.time()
        tags = dict.fromkeys(delivery_tags, now)
        if tags:
            self.client.zadd(_UNACKED_INDEX_KEY, tags, xx=True)

    def event_bus(self, redis_client: Redis, keys: RedisKeys, *, maxlen: int) -> EventBus:
        """The registry events stream in the shared-state Redis."""
        return RedisStreamEventBus(redis_client, keys.events, maxlen)

    def event_reader(self, redis_client: Redis, keys: RedisKeys) -> EventReader:
        """Reads the events stream from its current end."""
        return _StreamReader(redis_client, keys.events)


class _StreamReader:
    def __init__(self, redis_client: Redis, key: str) -> None:
        self._redis, self._key = redis_client, key
        newest: Any = redis_client.xrevrange(key, count=1)  # from now on: after the stream's newest entry
        self._last_id = _text(newest[0][0]) if newest else "0-0"

    def read(self, timeout_s: float) -> list[ReceivedEvent]:
        events = read_events(
            self._redis, self._key, after=self._last_id, count=_EVENTS_BATCH, block_ms=int(timeout_s * 1000)
        )
        if events:
            self._last_id = events[-1].entry_id or self._last_id
        return events

    def close(self) -> None:
        """Nothing held: the shared Redis client stays open."""
