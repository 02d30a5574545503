"""The broker seam (``tasks.brokers``) on both real brokers: declarations, depth, consumers, publish options,
dead-lettering and the registry event bus and reader."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import redis
from kombu import Connection

from provider.fleet.events import RegistryEvent
from provider.fleet.redis_keys import RedisKeys
from provider.protocol.errors import NoFleetQueue
from provider.settings import LaneSettings, Settings
from tasks.brokers import LaneBroker, RabbitMqLaneBroker, RedisLaneBroker, broker_for
from tests.conftest import BROKER_DB, STATE_DB, wait_until

READ_S = 5.0


@dataclass
class Seam:
    """One broker behind the seam, a kombu connection to it, and the shared-state Redis."""

    broker: LaneBroker
    connection: Connection
    state: redis.Redis
    keys: RedisKeys

    def lane(self) -> str:
        """A fresh lane name (lanes are never flushed: each test uses its own)."""
        return f"llm.fleet.inference.seam-{uuid.uuid4().hex[:8]}.ctx4096"

    def publish(self, lane: str, count: int) -> None:
        """``count`` messages into ``lane``, declared as the broker declares it."""
        queue = self.broker.lane_queue(lane)
        with self.connection.Producer() as producer:
            for n in range(count):
                producer.publish({"n": n}, exchange=queue.exchange, routing_key=lane, declare=[queue])


@pytest.fixture(params=["redis", "rabbitmq"])
def seam(request: pytest.FixtureRequest, redis_url: str, session_prefix: str) -> Iterator[Seam]:
    broker_url = request.getfixturevalue("rabbitmq_url") if request.param == "rabbitmq" else f"{redis_url}/{BROKER_DB}"
    settings = Settings(
        broker_url=broker_url,
        redis_url=f"{redis_url}/{STATE_DB}",
        key_prefix=f"{session_prefix}-seam-{uuid.uuid4().hex[:6]}",
        lanes=LaneSettings(max_length=20, message_ttl_s=30, delivery_limit=3),
    )
    state = redis.Redis.from_url(settings.redis_url)
    options = {"confirm_publish": True} if request.param == "rabbitmq" else {}  # as celeryconfig sets it
    with Connection(broker_url, transport_options=options) as connection:
        yield Seam(broker_for(settings), connection, state, RedisKeys(settings.key_prefix))


def test_broker_for_chooses_the_implementation_from_the_url(redis_url: str) -> None:
    assert isinstance(broker_for(Settings(broker_url=f"{redis_url}/1")), RedisLaneBroker)
    for scheme in ("amqp", "amqps", "pyamqp"):
        assert isinstance(broker_for(Settings(broker_url=f"{scheme}://guest:guest@h:5672//")), RabbitMqLaneBroker)


def test_lane_declarations_are_built_once_and_match_the_broker(seam: Seam) -> None:
    lane = seam.lane()
    queue = seam.broker.lane_queue(lane)
    assert seam.broker.lane_queue(lane) is queue
    arguments = queue.queue_arguments or {}
    if seam.broker.kind == "rabbitmq":
        assert arguments["x-queue-type"] == "quorum"
        assert arguments["x-overflow"] == "reject-publish"
    else:  # kombu's Redis transport would honour none (and x-expires deletes waiting messages)
        assert arguments == {}
    assert [q.name for q in seam.broker.control_queues()] == ["llm.fleet.control"]


def test_lane_depth_counts_waiting_messages(seam: Seam) -> None:
    lane = seam.lane()
    seam.publish(lane, 3)
    wait_until(lambda: seam.broker.lane_depth(lane, seam.connection) == 3, READ_S, "three messages in the lane")
    consumers = seam.broker.lane_consumers(lane, seam.connection)
    assert consumers == (0 if seam.broker.kind == "rabbitmq" else None)


def test_publish_options_per_broker(seam: Seam) -> None:
    options: dict[str, Any] = {"priority": 7}
    seam.broker.publish_options(options, 12.5)
    if seam.broker.kind == "rabbitmq":
        assert options == {"priority": 7, "expiration": 12.5, "mandatory": True}
    else:  # kombu's Redis transport serves priority 0 first
        assert options == {"priority": 2}


def _send_to(broker: LaneBroker, lane: str, queue: Any, task_id: str) -> Any:
    """What the producer's publish does: ``publish_options``, then a publish that declares the lane (kombu
    remembers the declaration for the connection)."""

    def send(producer: Any) -> None:
        options: dict[str, Any] = {}
        broker.publish_options(options, 30.0)
        producer.publish(
            {"n": 1}, exchange=queue.exchange, routing_key=lane, declare=[queue], correlation_id=task_id, **options
        )

    return send


def test_a_publish_to_a_lane_deleted_since_it_was_declared_is_delivered_not_dropped(seam: Seam) -> None:
    lane = seam.lane()
    queue = seam.broker.lane_queue(lane)
    with seam.connection.Producer() as producer:
        seam.broker.publish(producer, queue, "first", _send_to(seam.broker, lane, queue, "first"))
        assert seam.broker.lane_depth(lane, seam.connection) == 1
        if seam.broker.kind == "rabbitmq":  # an operator (or x-expires) deletes the lane; kombu still thinks it there
            queue(seam.connection.default_channel).delete()
        seam.broker.publish(producer, queue, "second", _send_to(seam.broker, lane, queue, "second"))
    # RabbitMQ: the second request is in the lane declared anew; Redis: both are in the list LPUSH made
    assert seam.broker.lane_depth(lane, seam.connection) == (1 if seam.broker.kind == "rabbitmq" else 2)


@pytest.mark.only_broker("rabbitmq")  # a Redis publish always lands in the list it names
def test_a_publish_no_queue_can_take_is_a_typed_error_on_rabbitmq(seam: Seam) -> None:
    lane = seam.lane()
    queue = seam.broker.lane_queue(lane)
    with seam.connection.Producer() as producer:
        with pytest.raises(NoFleetQueue, match="has no queue"):
            # routed by a key no lane is bound to: declaring the lane again cannot help
            seam.broker.publish(producer, queue, "stray", _send_to(seam.broker, f"{lane}.unbound", queue, "stray"))
        # the channel is still in step: the next publish is confirmed as its own and lands
        seam.broker.publish(producer, queue, "next", _send_to(seam.broker, lane, queue, "next"))
    assert seam.broker.lane_depth(lane, seam.connection) == 1


def test_a_rejected_message_is_dead_lettered_by_the_broker_only_where_it_says_so(seam: Seam) -> None:
    seam.broker.declare_dead_letters(seam.connection)
    lane = seam.lane()
    seam.publish(lane, 1)
    dead = seam.broker.dead_letter_queue().name
    before = seam.broker.lane_depth(dead, seam.connection)
    lane_reader = seam.connection.SimpleQueue(seam.broker.lane_queue(lane))
    try:
        lane_reader.get(timeout=READ_S).reject(requeue=False)
    finally:
        lane_reader.close()
    deadline = time.monotonic() + READ_S
    while seam.broker.lane_depth(dead, seam.connection) == before and time.monotonic() < deadline:
        if not seam.broker.dead_letters_rejected:  # nothing will arrive: the worker copies dead letters itself
            break
        time.sleep(0.05)
    arrived = seam.broker.lane_depth(dead, seam.connection) - before
    assert arrived == (1 if seam.broker.dead_letters_rejected else 0)
    assert seam.broker.lane_depth(lane, seam.connection) == 0


def test_event_bus_and_reader_carry_registry_events(seam: Seam) -> None:
    reader = seam.broker.event_reader(seam.state, seam.keys)
    bus = seam.broker.event_bus(seam.state, seam.keys, maxlen=100)
    offering_id = f"vllm:seam:inference:{uuid.uuid4().hex[:8]}"
    try:
        bus.publish(
            RegistryEvent.build(
                "offering_available",
                {"offering_id": offering_id, "model": "seam-model", "tier": "direct"},
                runtime={"host_id": "seam-host"},
                capacity={"concurrency": 1},
                health={"circuit": "closed"},
                lane="llm.fleet.inference.seam-model.ctx4096",
            )
        )
        assert bus.flush(READ_S)
        seen: list[str] = []
        deadline = time.monotonic() + READ_S
        while offering_id not in seen and time.monotonic() < deadline:
            seen.extend(str(item.event.offering.get("offering_id")) for item in reader.read(timeout_s=0.5))
        assert offering_id in seen
    finally:
        bus.close(timeout_s=1.0)
        reader.close()
