"""A request no worker takes: ``.get()`` raises ``FleetTimeout`` (``fleet_timeout``, retryable) by its deadline."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from provider.fleet.offerings import Offering
from provider.protocol import FleetError, FleetTimeout, codes
from tests.tasks.conftest import Fleet, wait_for

HELLO = [{"role": "user", "content": "anyone there?"}]


@pytest.fixture
def ghost(fleet: Fleet) -> Iterator[Offering]:
    """A live offering of a model of its own whose lane no worker consumes (a new lane each test: a producer
    never publishes into a lane it declared before and another test deleted)."""
    from tasks import app
    from tasks.routing import invalidate_route_cache, queue_for
    from tasks.runtime import runtime

    rt = runtime()
    offering = Offering(
        instance_id="ghost", model=f"ghost-{uuid.uuid4().hex[:8]}", context_window=8192, capabilities=("chat",)
    )
    rt.registry.register([offering], ttl_s=120)
    invalidate_route_cache()
    yield offering
    rt.registry.unregister([offering.offering_id])
    invalidate_route_cache()
    with app.connection_for_write() as conn:
        queue_for(offering.shared_lane)(conn.default_channel).delete()


def test_get_raises_fleet_timeout_when_no_worker_takes_the_request(fleet: Fleet, ghost: Offering) -> None:
    from tasks import chat

    result = chat.delay(model=ghost.model, messages=HELLO, timeout_s=2)
    assert result.lane == ghost.shared_lane
    with pytest.raises(FleetError) as info:  # what a caller catches, with its typed code
        result.get()
    assert isinstance(info.value, FleetTimeout)
    assert info.value.code == codes.FLEET_TIMEOUT
    assert info.value.retryable is True


def test_a_result_from_its_id_alone_also_ends_with_fleet_timeout(fleet: Fleet, ghost: Offering) -> None:
    from tasks import chat

    submitted = chat.delay(model=ghost.model, messages=HELLO, timeout_s=2)
    with pytest.raises(FleetTimeout):
        chat.AsyncResult(submitted.id).get(timeout=1.0)  # no deadline known here: the caller's own wait


@pytest.mark.only_broker("rabbitmq")
def test_rabbitmq_dead_letters_a_request_that_expired_unserved(fleet: Fleet, ghost: Offering) -> None:
    """The RabbitMQ dead-letter path: the broker moves the expired message to the dead-letter queue, where
    ``vllm-fleet dlq list`` shows it with RabbitMQ's reason and its lane; the caller got ``fleet_timeout``."""
    from tasks import chat
    from tasks.dead_letters import drop_dead_letters, list_dead_letters

    result = chat.delay(model=ghost.model, messages=HELLO, timeout_s=2)
    with pytest.raises(FleetTimeout):
        result.get()

    def listed() -> list[object]:
        return [letter for letter in list_dead_letters() if letter.task_id == result.id]

    try:
        wait_for(lambda: len(listed()) == 1, timeout_s=15, what="the expired request dead-lettered")
        (letter,) = [letter for letter in list_dead_letters() if letter.task_id == result.id]
        assert letter.reason == "expired"
        assert letter.lane == ghost.shared_lane
        assert letter.operation == "chat"
        assert letter.task == chat.name
    finally:
        drop_dead_letters(result.id)
    assert listed() == []


def test_a_request_revoked_as_expired_reads_as_fleet_timeout(fleet: Fleet, ghost: Offering) -> None:
    """A worker that receives a request past its ``expires`` stores it revoked (Celery's ``TaskRevokedError``):
    the caller gets ``FleetTimeout`` (matched by class), not Celery's exception."""
    from tasks import chat

    result = chat.delay(model=ghost.model, messages=HELLO, timeout_s=30)
    result.backend.mark_as_revoked(result.id, reason="expired")  # what the worker stores for an expired message
    with pytest.raises(FleetTimeout, match="expired before a worker took it") as info:
        result.get()
    assert info.value.code == codes.FLEET_TIMEOUT
