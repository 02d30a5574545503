"""A full lane refuses new work at publish time with a typed ``fleet_backpressure`` error."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from provider.fleet.offerings import Offering
from provider.protocol import FleetError
from tests.tasks.conftest import Fleet

GHOST_MODEL = "ghost-model"
HELLO = [{"role": "user", "content": "anyone there?"}]


@pytest.fixture
def unserved_lane(fleet: Fleet) -> Iterator[str]:
    """A lane in the registry that no worker consumes, so whatever is published to it stays there."""
    from tasks.routing import invalidate_route_cache, queue_for
    from tasks.runtime import runtime

    rt = runtime()
    ghost = Offering(instance_id="ghost", model=GHOST_MODEL, context_window=8192, capabilities=("chat",))
    rt.registry.register([ghost], ttl_s=120)
    invalidate_route_cache()
    yield ghost.shared_lane
    rt.registry.unregister([ghost.offering_id])
    invalidate_route_cache()
    from tasks import app

    with app.connection_for_write() as conn:
        lane = queue_for(ghost.shared_lane)(conn.default_channel)
        if fleet.broker == "redis":
            lane.purge()  # every priority list of the lane: delete alone leaves kombu's lists and messages
        lane.delete()


def test_full_lane_refuses_at_publish(fleet: Fleet, unserved_lane: str) -> None:
    from tasks import chat

    limit = fleet.settings.lanes.max_length
    for _ in range(limit):
        chat.delay(model=GHOST_MODEL, messages=HELLO, timeout_s=60)
    # RabbitMQ's reject-publish takes one message past the limit, then nacks (seen on 3.10); Redis refuses at once.
    with pytest.raises(FleetError) as info:
        for _ in range(2):
            chat.delay(model=GHOST_MODEL, messages=HELLO, timeout_s=60)
    assert info.value.code == "fleet_backpressure"
    assert info.value.retryable is True
    assert unserved_lane in info.value.message


def test_a_burst_within_the_depth_cache_window_is_still_refused_at_the_limit(
    fleet: Fleet, unserved_lane: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The producer reads a Redis lane's depth once and then counts its own publishes (no LLEN per publish):
    even when the read never goes stale, a burst reads it again past half the limit and stops at the limit."""
    if fleet.broker != "redis":
        pytest.skip("RabbitMQ bounds the lane itself (reject-publish); the producer reads no depth")
    import tasks.producer
    from tasks import chat
    from tasks.runtime import runtime

    monkeypatch.setattr(tasks.producer, "_ROOM_RECHECK_S", 3600.0)
    tasks.producer._lane_room.pop(unserved_lane, None)
    limit = fleet.settings.lanes.max_length
    for _ in range(limit):
        chat.delay(model=GHOST_MODEL, messages=HELLO, timeout_s=60)
    with pytest.raises(FleetError) as info:
        chat.delay(model=GHOST_MODEL, messages=HELLO, timeout_s=60)
    assert info.value.code == "fleet_backpressure"
    assert runtime().lane_depth(unserved_lane) == limit  # none published past it
