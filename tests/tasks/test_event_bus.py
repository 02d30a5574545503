"""Registry event buses on real Redis (db 15) and RabbitMQ (vhost "/", unique exchange and queue names).

Covers delivery and routing keys, the sanitizer run again at publish time (planted secrets in every section
are refused and nothing is sent), the bounded queue, and that a dead broker never blocks ``publish``.
"""

from __future__ import annotations

import multiprocessing
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from kombu import Connection, Exchange
from kombu.exceptions import OperationalError
from redis.backoff import NoBackoff
from redis.retry import Retry

from provider.fleet.events import REGISTRY_EXCHANGE, RegistryEvent, RegistryEventError, UnsafeEventError
from provider.fleet.redis_keys import RedisKeys
from tasks.event_bus import (
    AmqpEventBus,
    AmqpEventReader,
    BackgroundEventBus,
    EventBus,
    InMemoryEventBus,
    OutgoingEvent,
    RedisStreamEventBus,
    events_bus_for,
    read_events,
)
from tests.conftest import RABBIT_HOST, RABBIT_PORT, REDIS_HOST, REDIS_PORT, require_server

REDIS_DB = 15
AMQP_URL = f"amqp://guest:guest@{RABBIT_HOST}:{RABBIT_PORT}//"
DEAD_PORT = 1
DEAD_AMQP_URL = f"amqp://guest:guest@127.0.0.1:{DEAD_PORT}//"
# A non-blocking guarantee, not a benchmark: publish must not wait on a connect (1 s timeouts here), whatever the
# machine; half of that leaves a loaded host room (a 50 ms bound flaked under load).
NON_BLOCKING_BOUND_S = 0.5
FLUSH_S = 5.0
READ_S = 2.0
QUIET_S = 0.3
SECRET = "sk-PLANTED-7f3a9c"

STRICT_SECTIONS = ("runtime", "capacity", "health", "metadata")
PLANTS: dict[str, tuple[str, str]] = {
    "api_key": ("api_key", SECRET),
    "url": ("note", "see http://10.0.0.5:8000/v1/models"),
    "bearer": ("detail", f"Bearer {SECRET}"),
    "prompt": ("prompt", "tell me the launch codes"),
}


def make_event(event_type: str = "offering_heartbeat") -> RegistryEvent:
    """A valid event about one offering."""
    return RegistryEvent.build(
        event_type,
        {"offering_id": "vllm:gpu1:inference:qwen3-6-27b", "model": "qwen3-6-27b", "tier": "direct"},
        runtime={"host_id": "gpu-host-1"},
        capacity={"concurrency": 64, "waiting": 0},
        health={"circuit": "closed", "latency_avg_s": 0.2},
        lane="llm.fleet.inference.qwen3-6-27b.ctx32768",
        metadata={"observed_by": "test"},
    )


def slowest_publish_s(bus: EventBus, count: int) -> float:
    """Publish ``count`` events; the longest any one ``publish`` call took."""
    slowest_s = 0.0
    for _ in range(count):
        event = make_event()
        started = time.monotonic()
        bus.publish(event)
        slowest_s = max(slowest_s, time.monotonic() - started)
    return slowest_s


def plant(event: RegistryEvent, section: str, key: str, value: str) -> None:
    """Change a built event's section in place, the way a careless caller could."""
    target = getattr(event, section)
    assert isinstance(target, dict)
    target[key] = value


# --- fixtures ---------------------------------------------------------------------------------------------


@pytest.fixture
def client() -> Iterator[redis.Redis]:
    require_server("Redis", REDIS_HOST, REDIS_PORT)
    connection = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=REDIS_DB, socket_timeout=2)
    yield connection
    connection.close()


@pytest.fixture
def keys(client: redis.Redis) -> Iterator[RedisKeys]:
    prefix = f"test-events-{uuid.uuid4().hex}"
    yield RedisKeys(prefix)
    stale = list(client.scan_iter(match=f"{prefix}:*", count=500))
    if stale:
        client.delete(*stale)


@pytest.fixture
def redis_bus(client: redis.Redis, keys: RedisKeys) -> Iterator[RedisStreamEventBus]:
    bus = RedisStreamEventBus(client, keys.events, maxlen=100)
    yield bus
    bus.close()


@pytest.fixture
def exchange_name() -> Iterator[str]:
    """A registry exchange of this test's own on vhost "/", deleted afterwards."""
    require_server("RabbitMQ", RABBIT_HOST, RABBIT_PORT)
    name = f"{REGISTRY_EXCHANGE}.test-{uuid.uuid4().hex[:12]}"
    yield name
    with Connection(AMQP_URL, connect_timeout=2) as connection:
        Exchange(name, type="topic")(connection.default_channel).delete()


@pytest.fixture
def amqp_bus(exchange_name: str) -> Iterator[AmqpEventBus]:
    bus = AmqpEventBus(AMQP_URL, exchange=exchange_name)
    yield bus
    bus.close()


@pytest.fixture
def reader(exchange_name: str) -> Iterator[AmqpEventReader]:
    with AmqpEventReader(AMQP_URL, exchange=exchange_name) as bound:
        yield bound


# --- Redis stream -----------------------------------------------------------------------------------------


def test_redis_event_arrives_with_its_routing_key(
    redis_bus: RedisStreamEventBus, client: redis.Redis, keys: RedisKeys
) -> None:
    event = make_event("offering_available")
    redis_bus.publish(event)
    assert redis_bus.flush(FLUSH_S)
    [received] = read_events(client, keys.events)
    assert received.routing_key == "llm.registry.offering_available"
    assert received.event == event
    assert received.entry_id is not None
    assert redis_bus.stats().published == 1


def test_read_events_reads_on_and_skips_junk(
    redis_bus: RedisStreamEventBus, client: redis.Redis, keys: RedisKeys
) -> None:
    first, second = make_event(), make_event("offering_degraded")
    redis_bus.publish(first)
    assert redis_bus.flush(FLUSH_S)
    client.xadd(keys.events, {"routing_key": "llm.registry.offering_heartbeat", "event": "{not json"})
    redis_bus.publish(second)
    assert redis_bus.flush(FLUSH_S)
    [got_first, got_second] = read_events(client, keys.events)
    assert (got_first.event.event_id, got_second.event.event_id) == (first.event_id, second.event_id)
    assert got_first.entry_id is not None
    later = read_events(client, keys.events, after=got_first.entry_id)
    assert [item.event.event_id for item in later] == [second.event_id]
    assert read_events(client, keys.events, after="$", block_ms=10) == []


def test_redis_stream_is_capped(client: redis.Redis, keys: RedisKeys) -> None:
    with RedisStreamEventBus(client, keys.events, maxlen=3, approximate=False) as bus:
        events = [make_event() for _ in range(5)]
        for event in events:
            bus.publish(event)
        assert bus.flush(FLUSH_S)
    assert client.xlen(keys.events) == 3
    assert [item.event.event_id for item in read_events(client, keys.events)] == [
        event.event_id for event in events[2:]
    ]


@pytest.mark.parametrize("section", STRICT_SECTIONS)
@pytest.mark.parametrize("plant_name", sorted(PLANTS))
def test_planted_secrets_are_refused_before_publishing(
    redis_bus: RedisStreamEventBus, client: redis.Redis, keys: RedisKeys, section: str, plant_name: str
) -> None:
    event = make_event()
    key, value = PLANTS[plant_name]
    plant(event, section, key, value)
    with pytest.raises(UnsafeEventError) as refused:
        redis_bus.publish(event)
    assert refused.value.path.startswith(section)
    assert SECRET not in str(refused.value)
    assert redis_bus.flush(FLUSH_S)
    stats = redis_bus.stats()
    assert (stats.refused, stats.published) == (1, 0)
    assert client.xlen(keys.events) == 0


@pytest.mark.parametrize("plant_name", ["url", "bearer"])
def test_unsafe_values_in_the_offering_are_refused(
    redis_bus: RedisStreamEventBus, client: redis.Redis, keys: RedisKeys, plant_name: str
) -> None:
    event = make_event()
    key, value = PLANTS[plant_name]
    plant(event, "offering", key, value)
    with pytest.raises(UnsafeEventError):
        redis_bus.publish(event)
    assert redis_bus.flush(FLUSH_S)
    assert client.xlen(keys.events) == 0


def test_sensitive_offering_keys_are_dropped_not_sent(
    redis_bus: RedisStreamEventBus, client: redis.Redis, keys: RedisKeys
) -> None:
    event = make_event()
    plant(event, "offering", "api_key", SECRET)
    plant(event, "offering", "prompt", "tell me the launch codes")
    event.offering["metadata"] = {"nested": {"client_secret": SECRET}}
    redis_bus.publish(event)
    assert redis_bus.flush(FLUSH_S)
    [received] = read_events(client, keys.events)
    assert "api_key" not in received.event.offering
    assert "prompt" not in received.event.offering
    assert received.event.offering["metadata"] == {"nested": {}}
    assert SECRET not in repr(client.xrange(keys.events))


def test_a_nested_plant_is_refused(redis_bus: RedisStreamEventBus, client: redis.Redis, keys: RedisKeys) -> None:
    event = make_event()
    assert event.metadata is not None
    event.metadata["details"] = {"auth": {"bearer_token": SECRET}}
    with pytest.raises(UnsafeEventError) as refused:
        redis_bus.publish(event)
    assert refused.value.path == "metadata.details.auth.bearer_token"
    assert client.xlen(keys.events) == 0


def test_only_registry_events_are_accepted(
    redis_bus: RedisStreamEventBus, client: redis.Redis, keys: RedisKeys
) -> None:
    raw: Any = make_event().to_dict()
    with pytest.raises(TypeError):
        redis_bus.publish(raw)
    assert redis_bus.stats().refused == 1
    assert redis_bus.flush(FLUSH_S)
    assert client.xlen(keys.events) == 0


def test_changes_after_publish_are_not_sent(
    redis_bus: RedisStreamEventBus, client: redis.Redis, keys: RedisKeys
) -> None:
    event = make_event()
    redis_bus.publish(event)
    plant(event, "metadata", "api_key", SECRET)  # too late: the wire form was frozen at publish
    assert redis_bus.flush(FLUSH_S)
    [received] = read_events(client, keys.events)
    assert received.event.metadata == {"observed_by": "test"}


def test_a_dead_redis_never_blocks_publish() -> None:
    # No client retries, to keep the test short; publish() does not wait for them either way.
    dead = redis.Redis(host="127.0.0.1", port=DEAD_PORT, socket_connect_timeout=1, retry=Retry(NoBackoff(), 0))
    with RedisStreamEventBus(dead, "dead:events") as bus:
        assert slowest_publish_s(bus, 5) < NON_BLOCKING_BOUND_S
        assert bus.flush(FLUSH_S)
        stats = bus.stats()
        assert (stats.failed, stats.published, stats.pending) == (5, 0, 0)


def _publish_in_child(event_id: str) -> None:
    """Run in a forked child: publish one event through the bus inherited from the parent."""
    bus = _INHERITED["bus"]
    bus.publish(RegistryEvent.build("offering_heartbeat", {"offering_id": "x"}, event_id=event_id))
    raise SystemExit(0 if bus.flush(FLUSH_S) and bus.stats().published == 1 else 1)


_INHERITED: dict[str, RedisStreamEventBus] = {}


def test_a_forked_child_gets_its_own_sender(
    redis_bus: RedisStreamEventBus, client: redis.Redis, keys: RedisKeys
) -> None:
    redis_bus.publish(make_event())
    assert redis_bus.flush(FLUSH_S)
    _INHERITED["bus"] = redis_bus
    child_event_id = str(uuid.uuid4())
    child = multiprocessing.get_context("fork").Process(target=_publish_in_child, args=(child_event_id,))
    child.start()
    child.join(FLUSH_S)
    assert child.exitcode == 0
    ids = [item.event.event_id for item in read_events(client, keys.events)]
    assert ids[-1] == child_event_id
    redis_bus.publish(make_event())  # the parent's sender still works
    assert redis_bus.flush(FLUSH_S)
    assert redis_bus.stats().published == 2


# --- the queue itself -------------------------------------------------------------------------------------


class GatedBus(BackgroundEventBus):
    """Delivers only when the test opens the gate; remembers what it delivered."""

    def __init__(self, queue_size: int) -> None:
        super().__init__(queue_size=queue_size)
        self.started = threading.Event()
        self.gate = threading.Event()
        self.delivered: list[str] = []

    def _deliver(self, outgoing: OutgoingEvent) -> None:
        self.started.set()
        assert self.gate.wait(FLUSH_S)
        self.delivered.append(outgoing.routing_key)


def test_a_full_queue_drops_and_counts() -> None:
    bus = GatedBus(queue_size=2)
    bus.publish(make_event())
    assert bus.started.wait(FLUSH_S)  # the sender holds the first event
    assert slowest_publish_s(bus, 4) < NON_BLOCKING_BOUND_S
    assert bus.stats().dropped == 2
    assert not bus.flush(0.05)
    bus.gate.set()
    assert bus.flush(FLUSH_S)
    stats = bus.stats()
    assert (stats.published, stats.dropped, stats.pending) == (3, 2, 0)
    bus.close()


class FlakyBus(BackgroundEventBus):
    """Fails its first delivery, then delivers."""

    def __init__(self, failure_backoff_s: float) -> None:
        super().__init__(failure_backoff_s=failure_backoff_s)
        self.tries = 0

    def _deliver(self, outgoing: OutgoingEvent) -> None:
        self.tries += 1
        if self.tries == 1:
            raise ConnectionError("broker went away")


def test_after_a_failure_the_bus_backs_off_then_recovers(caplog: pytest.LogCaptureFixture) -> None:
    backoff_s = 0.2
    with FlakyBus(failure_backoff_s=backoff_s) as bus:
        bus.publish(make_event())
        assert bus.flush(FLUSH_S)
        bus.publish(make_event())  # within the back-off: failed without a try
        assert bus.flush(FLUSH_S)
        assert (bus.tries, bus.stats().failed) == (1, 2)
        time.sleep(backoff_s)
        bus.publish(make_event())
        assert bus.flush(FLUSH_S)
        assert (bus.tries, bus.stats().published) == (2, 1)
    warnings = [record.getMessage() for record in caplog.records if record.levelname == "WARNING"]
    assert warnings == ["registry events: FlakyBus cannot publish (ConnectionError)"]


def test_close_delivers_what_is_queued_then_drops() -> None:
    bus = GatedBus(queue_size=10)
    for _ in range(3):
        bus.publish(make_event())
    bus.gate.set()
    bus.close()
    assert len(bus.delivered) == 3
    bus.publish(make_event())
    assert bus.stats().dropped == 1


def test_in_memory_bus_keeps_sanitized_events() -> None:
    bus = InMemoryEventBus()
    event = make_event("offering_unavailable")
    bus.publish(event)
    assert [item.routing_key for item in bus.received] == ["llm.registry.offering_unavailable"]
    plant(event, "health", "token", SECRET)
    with pytest.raises(RegistryEventError):
        bus.publish(event)
    assert (bus.stats().published, bus.stats().refused) == (1, 1)


@pytest.mark.parametrize(
    ("broker_url", "kind"),
    [
        ("amqp://guest:guest@rabbit:5672//", AmqpEventBus),
        ("amqps://user:pw@rabbit:5671/fleet", AmqpEventBus),
        ("pyamqp://rabbit//", AmqpEventBus),
        ("redis://127.0.0.1:6379/0", RedisStreamEventBus),
        ("rediss://cache:6380/0", RedisStreamEventBus),
    ],
)
def test_events_bus_for_picks_by_broker(broker_url: str, kind: type[BackgroundEventBus]) -> None:
    keys = RedisKeys("pick")
    bus = events_bus_for(broker_url, redis.Redis(), keys, maxlen=42)
    assert type(bus) is kind
    if isinstance(bus, RedisStreamEventBus):
        assert (bus.key, bus.maxlen) == (keys.events, 42)
    else:
        assert isinstance(bus, AmqpEventBus)
        assert bus.exchange_name == REGISTRY_EXCHANGE
        assert "guest" not in repr(bus)
        assert "pw" not in repr(bus)


# --- RabbitMQ ---------------------------------------------------------------------------------------------


@pytest.mark.rabbitmq
def test_amqp_event_arrives_with_its_routing_key(amqp_bus: AmqpEventBus, reader: AmqpEventReader) -> None:
    event = make_event("offering_degraded")
    amqp_bus.publish(event)
    assert amqp_bus.flush(FLUSH_S)
    received = reader.get(READ_S)
    assert received is not None
    assert received.routing_key == "llm.registry.offering_degraded"
    assert received.delivery_mode == 1
    assert received.event == event
    assert amqp_bus.stats().published == 1


@pytest.mark.rabbitmq
def test_amqp_binding_keys_select_event_types(amqp_bus: AmqpEventBus, exchange_name: str) -> None:
    with AmqpEventReader(
        AMQP_URL, exchange=exchange_name, binding_key="llm.registry.offering_unavailable"
    ) as unavailable_only:
        amqp_bus.publish(make_event("offering_heartbeat"))
        gone = make_event("offering_unavailable")
        amqp_bus.publish(gone)
        assert amqp_bus.flush(FLUSH_S)
        received = unavailable_only.drain(QUIET_S)
    assert [item.event.event_id for item in received] == [gone.event_id]


@pytest.mark.rabbitmq
@pytest.mark.parametrize("plant_name", sorted(PLANTS))
def test_amqp_planted_secrets_are_refused(amqp_bus: AmqpEventBus, reader: AmqpEventReader, plant_name: str) -> None:
    key, value = PLANTS[plant_name]
    for section in STRICT_SECTIONS:
        event = make_event()
        plant(event, section, key, value)
        with pytest.raises(UnsafeEventError):
            amqp_bus.publish(event)
    assert amqp_bus.flush(FLUSH_S)
    assert amqp_bus.stats().refused == len(STRICT_SECTIONS)
    assert reader.get(QUIET_S) is None


@pytest.mark.rabbitmq
def test_amqp_reconnects_after_the_connection_drops(amqp_bus: AmqpEventBus, reader: AmqpEventReader) -> None:
    amqp_bus.publish(make_event())
    assert amqp_bus.flush(FLUSH_S)
    connection = amqp_bus._connection  # white-box: break the live connection under the bus
    assert connection is not None
    connection.collect()
    after = make_event()
    amqp_bus.publish(after)
    assert amqp_bus.flush(FLUSH_S)
    received = reader.drain(QUIET_S)
    assert [item.event.event_id for item in received][-1] == after.event_id
    assert amqp_bus._connection is not connection
    assert amqp_bus.stats().failed == 0


def test_a_dead_amqp_broker_never_blocks_publish() -> None:
    with AmqpEventBus(DEAD_AMQP_URL) as bus:
        assert slowest_publish_s(bus, 10) < NON_BLOCKING_BOUND_S
        assert bus.flush(FLUSH_S)
        stats = bus.stats()
        assert (stats.failed, stats.published, stats.pending) == (10, 0, 0)


def test_a_dead_amqp_reader_fails_fast() -> None:
    started = time.monotonic()
    with pytest.raises(OperationalError):
        AmqpEventReader(DEAD_AMQP_URL).open()
    assert time.monotonic() - started < FLUSH_S
