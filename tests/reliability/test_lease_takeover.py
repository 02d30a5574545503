"""Defect 3 of issue 15: a redelivered request takes over a dead worker's lease at once (its heartbeat is gone)
instead of waiting out the lease, and never takes a live worker's: neither one whose heartbeat key is current nor
one whose key lapsed while its named heartbeat connection is still open (a slow worker, not a dead one)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable

import redis

from provider.protocol import ClaimStatus, JtiLedger
from provider.protocol.ledger import holder_client_name
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


def test_a_live_holder_whose_heartbeat_key_lapsed_keeps_its_lease(redis_url: str) -> None:
    """A worker too starved to renew its heartbeat key in time still holds its named connection: not dead."""
    url = f"{redis_url}/{STATE_DB}"
    ledger = JtiLedger(redis.Redis.from_url(url), f"rel-lease-{uuid.uuid4().hex[:8]}", lease_s=60)
    holder = f"slow host:{uuid.uuid4().hex[:8]}"  # a space: the client name replaces it
    own = redis.Redis.from_url(url, client_name=holder_client_name(holder), single_connection_client=True)
    try:
        ledger.heartbeat(holder, ttl_s=0.05, client=own)  # the key lapses almost at once
        jti = uuid.uuid4().hex
        assert ledger.claim(jti, "digest", holder).status is ClaimStatus.TAKEN
        own.ping()
        assert _lapsed(ledger, holder)
        assert ledger.holder_connected(holder)
        assert not ledger.take_over_if_dead(jti, holder, "redelivery"), "a slow live holder keeps its lease"
        assert ledger.peek(jti)["holder"] == holder  # type: ignore[index]
    finally:
        own.close()
    # the connection is gone (as when the kernel closes a killed worker's sockets): now it is dead
    _wait(lambda: not ledger.holder_connected(holder))
    assert ledger.take_over_if_dead(jti, holder, "redelivery")
    assert ledger.peek(jti)["holder"] == "redelivery"  # type: ignore[index]


def test_renew_many_renews_every_held_lease_and_skips_the_rest(redis_url: str) -> None:
    client = redis.Redis.from_url(f"{redis_url}/{STATE_DB}")
    ledger = JtiLedger(client, f"rel-lease-{uuid.uuid4().hex[:8]}", lease_s=60)
    mine = [uuid.uuid4().hex for _ in range(3)]
    theirs, unknown = uuid.uuid4().hex, uuid.uuid4().hex
    for jti in mine:
        assert ledger.claim(jti, "digest", "me").status is ClaimStatus.TAKEN
        client.hset(ledger.key(jti), "lease_until", 1)  # as if about to lapse
    assert ledger.claim(theirs, "digest", "other").status is ClaimStatus.TAKEN
    before_theirs = ledger.peek(theirs)["lease_until"]  # type: ignore[index]

    assert ledger.renew_many([*mine, theirs, unknown], "me") == [True, True, True, False, False]
    for jti in mine:
        assert int(ledger.peek(jti)["lease_until"]) > 1  # type: ignore[index]
        assert ledger.claim(jti, "digest", "redelivery").status is ClaimStatus.HELD
    assert ledger.peek(theirs)["lease_until"] == before_theirs  # type: ignore[index]
    assert ledger.peek(unknown) is None
    assert ledger.renew_many([], "me") == []


def _lapsed(ledger: JtiLedger, holder: str) -> bool:
    _wait(lambda: not ledger.holder_alive(holder))
    return True


def _wait(predicate: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)
