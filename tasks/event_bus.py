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

The engine is in ``tasks.event_bus_base``, the transports in ``tasks.event_bus_redis`` and ``tasks.event_bus_amqp``;
this module re-exports them. :func:`events_bus_for` picks AMQP for ``amqp://``/``amqps://``/``pyamqp://`` brokers,
else the Redis stream.
"""

from __future__ import annotations

import redis

from provider.fleet.names import broker_is_amqp
from provider.fleet.redis_keys import RedisKeys
from tasks.event_bus_amqp import AmqpEventBus, AmqpEventReader
from tasks.event_bus_base import (
    ALL_REGISTRY_EVENTS,
    AMQP_CONNECT_TIMEOUT_S,
    DEFAULT_QUEUE_SIZE,
    EVENTS_STREAM_MAX_LEN,
    BackgroundEventBus,
    EventBus,
    EventBusStats,
    InMemoryEventBus,
    OutgoingEvent,
    ReceivedEvent,
)
from tasks.event_bus_redis import RedisStreamEventBus, read_events

__all__ = [
    "ALL_REGISTRY_EVENTS",
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


def events_bus_for(
    broker_url: str,
    redis_client: redis.Redis,
    keys: RedisKeys,
    *,
    maxlen: int = EVENTS_STREAM_MAX_LEN,
    queue_size: int = DEFAULT_QUEUE_SIZE,
) -> BackgroundEventBus:
    """AMQP for an AMQP broker, else the Redis stream ``keys.events``."""
    if broker_is_amqp(broker_url):
        return AmqpEventBus(broker_url, queue_size=queue_size)
    return RedisStreamEventBus(redis_client, keys.events, maxlen, queue_size=queue_size)
