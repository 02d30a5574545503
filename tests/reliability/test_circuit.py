"""Defect 2 of issue 15: the circuit breaker counts failing requests (not attempts), and never gives its
half-open probe to a request about to expire."""

from __future__ import annotations

import uuid

import redis

from provider.fleet.health import HealthTracker
from provider.fleet.redis_keys import RedisKeys
from tests.conftest import STATE_DB
from tests.reliability.conftest import LiveFleet
from tests.reliability.harness import CHAT_MODEL


def test_half_open_probe_goes_only_to_a_request_with_time_left(redis_url: str) -> None:
    now = [1_700_000_000.0]
    client = redis.Redis.from_url(f"{redis_url}/{STATE_DB}")
    tracker = HealthTracker(
        client,
        RedisKeys(f"rel-circuit-{uuid.uuid4().hex[:8]}"),
        failure_threshold=1,
        half_open_after_s=10,
        probe_min_time_left_s=5,
        clock=lambda: now[0],
    )
    tracker.record_failure("gpu", "server_error")
    now[0] += 11
    assert not tracker.allow("gpu", time_left_s=1.0), "a request with 1 s left must not be the probe"
    assert tracker.state("gpu").circuit == "half_open"
    assert not tracker.state("gpu").probe_in_flight
    assert tracker.allow("gpu", time_left_s=30.0)
    assert tracker.state("gpu").probe_in_flight
    assert tracker.allow("other", time_left_s=0.1), "a closed circuit lets every call through"


def test_a_blip_seen_by_one_requests_retries_does_not_open_the_circuit(live_fleet: LiveFleet) -> None:
    from tasks import chat

    health = HealthTracker.from_settings(live_fleet.state, live_fleet.settings)
    health.reset("sim-a")
    live_fleet.sim.configure(failures=[{"route": "chat", "mode": "status", "status": 500, "count": 3}])
    try:
        prompt = f"retry-{uuid.uuid4().hex[:6]}"
        result = chat.delay(model=CHAT_MODEL, messages=[{"role": "user", "content": prompt}], max_tokens=4)
        assert result.get()["content"] == prompt
        assert live_fleet.sim.ran(prompt) == 4, "three failed attempts, then the answer"
        hand_backs = RedisKeys(live_fleet.settings.key_prefix).hand_backs(result.id)
        assert not live_fleet.state.exists(hand_backs), "the circuit never opened, nothing was handed back"
        assert health.state("sim-a").circuit == "closed"
    finally:
        live_fleet.sim.configure(failures=[])
        health.reset("sim-a")
