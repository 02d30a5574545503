"""Registry events on a Redis stream: the publishing bus (``XADD`` to one capped stream) and its reader."""

from __future__ import annotations

import logging
from typing import Any

import redis

from provider.fleet.events import RegistryEvent, RegistryEventError
from tasks.event_bus_base import (
    DEFAULT_QUEUE_SIZE,
    EVENTS_STREAM_MAX_LEN,
    FAILURE_BACKOFF_S,
    BackgroundEventBus,
    OutgoingEvent,
    ReceivedEvent,
)

__all__ = ["RedisStreamEventBus", "read_events"]

logger = logging.getLogger("tasks.event_bus")


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


def _text(value: object) -> str:
    """A Redis reply as text (clients may or may not decode responses)."""
    if isinstance(value, bytes):
        return value.decode("utf-8")
    return str(value)
