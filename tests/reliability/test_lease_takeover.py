"""Defect 3 of issue 15: a redelivered request takes over a dead worker's lease at once (its heartbeat is gone)
instead of waiting out the lease, and never takes a live worker's."""

from __future__ import annotations

import uuid

import redis

from provider.protocol import ClaimStatus, JtiLedger
from tests.conftest import STATE_DB


def test_a_dead_holders_lease_is_taken_over_and_a_live_ones_is_not(redis_url: str) -> None:
    ledger = JtiLedger(redis.Redis.from_url(f"{redis_url}/{STATE_DB}"), f"rel-lease-{uuid.uuid4().hex[:8]}", lease_s=60)
    jti = uuid.uuid4().hex
    ledger.heartbeat("live-worker", ttl_s=30)
    assert ledger.claim(jti, "digest", "live-worker").status is ClaimStatus.TAKEN
    held = ledger.claim(jti, "digest", "redelivery")
    assert held.status is ClaimStatus.HELD
    assert held.lease_left_s is not None and held.lease_left_s > 50  # noqa: PT018 - waiting it out = 60 s
    assert not ledger.take_over_if_dead(jti, "live-worker", "redelivery"), "a live holder keeps its lease"

    dead = uuid.uuid4().hex
    assert ledger.claim(dead, "digest", "dead-worker").status is ClaimStatus.TAKEN  # never had a heartbeat
    assert ledger.take_over_if_dead(dead, "dead-worker", "redelivery")
    assert ledger.peek(dead)["holder"] == "redelivery"  # type: ignore[index]
    assert ledger.claim(dead, "digest", "third").status is ClaimStatus.HELD
    assert not ledger.take_over_if_dead(dead, "dead-worker", "third"), "only from the holder it saw"
