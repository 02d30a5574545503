"""Every queue, exchange, routing-key prefix and message header name the fleet puts on a broker, in one place.

Strings only: the declarations (durability, arguments) are in ``tasks.queues``; Redis keys are in
``provider.fleet.redis_keys``. The dead-letter queue's name is a setting (``LaneSettings.dead_letter_queue``).
"""

from __future__ import annotations

from typing import Final
from urllib.parse import urlsplit

__all__ = [
    "AMQP_SCHEMES",
    "CONTROL_QUEUE",
    "DEAD_LETTER_EXCHANGE",
    "DEAD_LETTER_REASON_HEADER",
    "DEAD_LETTER_SOURCE_HEADER",
    "DEATH_HEADER",
    "DELIVERY_COUNT_HEADER",
    "FIRST_DEATH_REASON_HEADER",
    "FLEET_EXCHANGE",
    "LANE_PREFIX",
    "MANAGEMENT_QUEUE_PREFIX",
    "REGISTRY_EXCHANGE",
    "REGISTRY_ROUTING_PREFIX",
    "broker_is_amqp",
]

# Broker URL schemes that mean RabbitMQ (AMQP); any other broker URL is Redis.
AMQP_SCHEMES: Final = frozenset({"amqp", "amqps", "pyamqp"})

# Lane keys (queue names and routing keys): ``llm.fleet.<embed|inference>.<model>...`` (``provider.fleet.lanes``).
LANE_PREFIX: Final = "llm.fleet"
# The exchange lanes are bound to: topic on RabbitMQ, direct on Redis.
FLEET_EXCHANGE: Final = "llm.fleet"
# Where RabbitMQ (and a worker, at its delivery limit) dead-letters a lane's message.
DEAD_LETTER_EXCHANGE: Final = "llm.fleet.dlx"
# Celery's default queue: nothing but control traffic is routed there.
CONTROL_QUEUE: Final = "llm.fleet.control"
# One management queue per instance, owned by the worker serving it: ``llm.fleet.mgmt.<instance-slug>``.
MANAGEMENT_QUEUE_PREFIX: Final = "llm.fleet.mgmt."
# Registry events: a topic exchange, routing keys ``llm.registry.<event_type>`` (``provider.fleet.events``).
REGISTRY_EXCHANGE: Final = "llm.registry"
REGISTRY_ROUTING_PREFIX: Final = "llm.registry"

# Headers the fleet writes on a dead-lettered copy: why, and from which lane.
DEAD_LETTER_REASON_HEADER: Final = "x-fleet-dead-letter-reason"
DEAD_LETTER_SOURCE_HEADER: Final = "x-fleet-dead-letter-source"
# Headers RabbitMQ writes: a quorum queue's delivery count, and the dead-letter history.
DELIVERY_COUNT_HEADER: Final = "x-delivery-count"
DEATH_HEADER: Final = "x-death"
FIRST_DEATH_REASON_HEADER: Final = "x-first-death-reason"


def broker_is_amqp(broker_url: str) -> bool:
    """Whether a broker URL names RabbitMQ (``amqp://``, ``amqps://``, ``pyamqp://``, any case) rather than Redis:
    the fleet's one such check."""
    return urlsplit(broker_url).scheme.lower() in AMQP_SCHEMES
