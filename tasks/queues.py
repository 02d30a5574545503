"""Lane and management queue declarations, the same in every process (a different declaration fails with 406).

On RabbitMQ a lane is a durable quorum queue bound to the ``llm.fleet`` topic exchange, with reject-publish
overflow (a full lane refuses at publish: ``fleet_backpressure``), a message TTL, a delivery limit and a
dead-letter exchange that keeps what failed. On Redis kombu honours none of these arguments (and deletes a
lane's waiting messages when given ``x-expires``), so a Redis lane is a plain list: the producer bounds its
length before publishing (``tasks.producer``) and the deadline in every envelope replaces the TTL.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from kombu import Exchange, Queue

from provider.fleet.names import CONTROL_QUEUE, DEAD_LETTER_EXCHANGE, FLEET_EXCHANGE, MANAGEMENT_QUEUE_PREFIX
from provider.settings import LaneSettings

__all__ = [
    "CONTROL_QUEUE",
    "DEAD_LETTER_EXCHANGE",
    "FLEET_EXCHANGE",
    "dead_letter_queue",
    "lane_queue",
    "management_queue_name",
]

QUEUE_DELIVERY_LIMIT_MARGIN = 3


def management_queue_name(instance_slug: str) -> str:
    """The queue owned by the worker serving one instance."""
    return f"{MANAGEMENT_QUEUE_PREFIX}{instance_slug}"


def _amqp_lane_arguments(lanes: LaneSettings) -> dict[str, Any]:
    arguments: dict[str, Any] = {
        "x-queue-type": "quorum",
        "x-queue-leader-locator": "balanced",
        "x-overflow": "reject-publish",
        "x-message-ttl": int(lanes.message_ttl_s * 1000),
        "x-max-length": int(lanes.max_length),
        # Above the workers' own hand-back limit: a worker dead-letters a request itself at its limit and tells
        # its caller (fleet_dead_lettered); RabbitMQ also counts returns that are not hand-backs (a consumer
        # cancelled while its instance's circuit opened, a worker that died), and would otherwise dead-letter
        # first, silently. The queue's limit stays as a backstop for a message that kills every worker.
        "x-delivery-limit": int(lanes.delivery_limit) + QUEUE_DELIVERY_LIMIT_MARGIN,
        "x-dead-letter-exchange": DEAD_LETTER_EXCHANGE,
        "x-dead-letter-routing-key": lanes.dead_letter_queue,
        "x-dead-letter-strategy": "at-least-once",
    }
    if lanes.expires_s is not None:
        arguments["x-expires"] = int(lanes.expires_s * 1000)
    return arguments


@lru_cache(maxsize=4096)
def lane_queue(name: str, lanes: LaneSettings, amqp: bool) -> Queue:
    """The declaration of one lane (or management queue) for the broker in use."""
    if not amqp:
        return Queue(name, Exchange(FLEET_EXCHANGE, type="direct"), routing_key=name)
    # at-least-once dead-lettering needs reject-publish overflow, which the arguments set.
    return Queue(
        name,
        Exchange(FLEET_EXCHANGE, type="topic", durable=True),
        routing_key=name,
        durable=True,
        queue_arguments=_amqp_lane_arguments(lanes),
        consumer_arguments={"x-priority": int(lanes.consumer_priority)},
    )


def dead_letter_queue(lanes: LaneSettings, amqp: bool) -> Queue:
    """Where RabbitMQ puts what a lane could not deliver (expired, over the delivery limit)."""
    if not amqp:
        return Queue(lanes.dead_letter_queue, Exchange(DEAD_LETTER_EXCHANGE, type="direct"))
    return Queue(
        lanes.dead_letter_queue,
        Exchange(DEAD_LETTER_EXCHANGE, type="topic", durable=True),
        routing_key="#",
        durable=True,
        queue_arguments={"x-queue-type": "quorum"},
    )
