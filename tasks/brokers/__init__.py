"""The broker seam: what differs between a Redis and a RabbitMQ broker, behind one ``LaneBroker`` interface.

Holds lane and dead-letter declarations, lane depth, publish options, dead-lettering and the registry event bus
per broker; chosen once from the settings (``broker_for``). Imports kombu and redis, never celery's app.
"""

from __future__ import annotations

from tasks.brokers.base import EventReader, LaneBroker, broker_for, broker_is_amqp
from tasks.brokers.rabbitmq import RabbitMqLaneBroker
from tasks.brokers.redis import RedisLaneBroker

__all__ = ["EventReader", "LaneBroker", "RabbitMqLaneBroker", "RedisLaneBroker", "broker_for", "broker_is_amqp"]
