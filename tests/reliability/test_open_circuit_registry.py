"""Issue 11 item 6: an instance whose circuit is open reads ``degraded`` in the registry, so a submit routes
elsewhere or fails fast (``fleet_unavailable``) instead of queueing work nobody will take."""

from __future__ import annotations

import time

import pytest

from provider.fleet.health import HealthTracker
from provider.fleet.redis_keys import RedisKeys
from provider.protocol import FleetError
from tests.reliability.conftest import LiveFleet
from tests.reliability.harness import CHAT_MODEL, wait_until


def _statuses(instance: str) -> set[str]:
    from tasks.runtime import runtime

    return {o.status for o in runtime().registry.all() if o.instance_id == instance}


def test_open_circuit_marks_offerings_degraded_and_submit_fails_fast(live_fleet: LiveFleet) -> None:
    from tasks import chat
    from tasks.routing import invalidate_route_cache

    health = HealthTracker.from_settings(live_fleet.state, live_fleet.settings)
    key = RedisKeys(live_fleet.settings.key_prefix).health("sim-a")
    # open, and staying open for a minute (as after failures, with the half-open time in the future)
    live_fleet.state.hset(key, mapping={"circuit": "open", "failures": 3, "opened_at": repr(time.time() + 60)})
    try:
        wait_until(lambda: _statuses("sim-a") == {"degraded"}, 15, "offerings marked degraded")
        invalidate_route_cache()
        with pytest.raises(FleetError) as refused:
            chat.delay(model=CHAT_MODEL, messages=[{"role": "user", "content": "anyone?"}])
        assert refused.value.code == "fleet_unavailable"
        assert refused.value.retryable
    finally:
        health.reset("sim-a")
    wait_until(lambda: _statuses("sim-a") == {"available"}, 15, "offerings available again")
    invalidate_route_cache()
    assert chat.delay(model=CHAT_MODEL, messages=[{"role": "user", "content": "back"}]).get()["content"]
