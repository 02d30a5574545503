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
        queue_for(ghost.shared_lane)(conn.default_channel).delete()


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
