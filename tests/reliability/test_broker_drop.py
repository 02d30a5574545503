"""Defect 1 of issue 15: a task finishing after the Redis broker connection dropped must not stop the worker.

Observed under load (3 runs in 5): the broker drops, Celery collects the connection (kombu detaches the
transport from its client) while the task channel's closing has already dropped its connection pools; a task
that finishes then acks on that channel, kombu builds a pool from the detached transport and raises
``AttributeError("'NoneType' object has no attribute 'hostname'")``, which Celery reports as an unrecoverable
error and the worker exits. The ack must fail as a broker connection error instead, which Celery logs.
"""

from __future__ import annotations

import logging

import pytest
from kombu import Connection

from tasks.consumer import guard_redis_transport
from tests.conftest import BROKER_DB

QUEUE = "vft-broker-drop-probe"


def test_ack_after_the_connection_dropped_is_a_connection_error_not_an_attribute_error(redis_url: str) -> None:
    guard_redis_transport()
    url = f"{redis_url}/{BROKER_DB}"
    with Connection(url) as producer:
        producer.SimpleQueue(QUEUE).put({"hello": "world"})
    connection = Connection(url)
    message = connection.SimpleQueue(QUEUE, no_ack=False).get(timeout=5)
    errors = tuple(connection.connection_errors)
    # The state a worker's task channel was left in after the broker dropped (the traceback's): its pools
    # disconnected (the first step of closing a Redis channel) and its transport detached from its client.
    message.channel._disconnect_pools()
    message.channel.connection.client = None
    with pytest.raises(errors):
        message.ack()
    message.ack_log_error(logging.getLogger("test"), errors)  # logged, never raised: the worker lives on
    with Connection(url) as cleanup:
        cleanup.default_channel.queue_delete(QUEUE)
        cleanup.default_channel.client.delete("unacked", "unacked_index")
