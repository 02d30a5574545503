"""The jti ledger and the idempotency store against a real Redis (db 15, one key prefix per test)."""

from __future__ import annotations

import os
import threading
import uuid
from collections.abc import Callable, Iterator
from typing import TypeVar

import pytest
import redis

from provider.protocol import (
    ClaimStatus,
    IdempotencyConflictError,
    IdempotencyStore,
    IdemStatus,
    JtiLedger,
    ReplayedError,
)
from tests.conftest import wait_until

REDIS_HOST = "127.0.0.1"
REDIS_PORT = 6379
REDIS_DB = 15
SHORT_LEASE_S = 1.0  # long enough that two claims in a row fall inside it, even on a loaded host
POLL_TIMEOUT_S = 10.0
_T = TypeVar("_T")


def poll(read: Callable[[], _T], done: Callable[[_T], bool], timeout_s: float = POLL_TIMEOUT_S) -> _T:
    """``read()`` again until ``done`` holds for its value (which is returned), or fail after ``timeout_s``."""
    # wrapped: the value looked for may itself be false (None once a record expired)
    found = wait_until(lambda: (value,) if done(value := read()) else None, timeout_s, "the ledger's state")
    return found[0]


CONCURRENT_CLAIMERS = 16


def _connect(decode: bool) -> redis.Redis:
    client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=REDIS_DB, decode_responses=decode, socket_timeout=2)
    try:
        client.ping()
    except redis.RedisError as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(f"Redis is required in CI: {exc}")
        pytest.skip(f"Redis not reachable at {REDIS_HOST}:{REDIS_PORT}: {exc}")
    return client


def _flush(client: redis.Redis, prefix: str) -> None:
    keys = list(client.scan_iter(match=f"{prefix}:*", count=500))
    if keys:
        client.delete(*keys)


@pytest.fixture(params=[False, True], ids=["bytes", "decoded"])
def client(request: pytest.FixtureRequest) -> Iterator[redis.Redis]:
    connection = _connect(bool(request.param))
    yield connection
    connection.close()


@pytest.fixture
def prefix(client: redis.Redis) -> Iterator[str]:
    name = f"test-protocol-{uuid.uuid4().hex}"
    _flush(client, name)
    yield name
    _flush(client, name)


def test_claim_complete_answer(client: redis.Redis, prefix: str) -> None:
    ledger = JtiLedger(client, prefix, lease_s=30)
    first = ledger.claim("j1", "d1", "worker-a")
    assert first.status is ClaimStatus.TAKEN
    assert first.holder == "worker-a"
    assert first.lease_left_s == pytest.approx(30)
    held = ledger.claim("j1", "d1", "worker-b")
    assert held.status is ClaimStatus.HELD
    assert held.holder == "worker-a"
    assert held.lease_left_s is not None
    assert 0 < held.lease_left_s <= 30
    assert ledger.complete("j1", "worker-a", {"content": "hi"}, ttl_s=60)
    done = ledger.claim("j1", "d1", "worker-c")
    assert done.status is ClaimStatus.COMPLETED
    assert done.result == {"content": "hi"}
    record = ledger.peek("j1")
    assert record is not None
    assert record["state"] == "done"
    assert record["digest"] == "d1"
    assert ledger.peek("nothing") is None


def test_other_message_with_same_jti_is_a_replay(client: redis.Redis, prefix: str) -> None:
    ledger = JtiLedger(client, prefix)
    ledger.claim("j1", "d1", "worker-a").raise_if_replayed()
    outcome = ledger.claim("j1", "d2", "worker-b")
    assert outcome.status is ClaimStatus.MISMATCH
    with pytest.raises(ReplayedError):
        outcome.raise_if_replayed()
    ledger.complete("j1", "worker-a", {"ok": True}, ttl_s=60)
    assert ledger.claim("j1", "d2", "worker-b").status is ClaimStatus.MISMATCH
    assert ledger.claim("j1", "d1", "worker-b").result == {"ok": True}


def test_stored_result_is_never_overwritten(client: redis.Redis, prefix: str) -> None:
    ledger = JtiLedger(client, prefix)
    ledger.claim("j1", "d1", "worker-a")
    assert ledger.complete("j1", "worker-a", {"n": 1}, ttl_s=60)
    assert not ledger.complete("j1", "worker-a", {"n": 2}, ttl_s=60)
    assert not ledger.complete("j1", "worker-b", {"n": 3}, ttl_s=60)
    assert not ledger.release("j1", "worker-a")
    assert not ledger.renew("j1", "worker-a")
    assert ledger.claim("j1", "d1", "worker-b").result == {"n": 1}


def test_lease_expiry_takeover(client: redis.Redis, prefix: str) -> None:
    ledger = JtiLedger(client, prefix, lease_s=SHORT_LEASE_S)
    assert ledger.claim("j1", "d1", "worker-a").status is ClaimStatus.TAKEN
    held = ledger.claim("j1", "d1", "worker-b")
    assert held.status is ClaimStatus.HELD
    assert held.lease_left_s is not None
    assert 0 < held.lease_left_s <= SHORT_LEASE_S
    takeover = poll(lambda: ledger.claim("j1", "d1", "worker-b"), lambda outcome: outcome.status is ClaimStatus.TAKEN)
    assert takeover.holder == "worker-b"
    assert not ledger.complete("j1", "worker-a", {"from": "a"}, ttl_s=60)
    assert not ledger.renew("j1", "worker-a")
    assert ledger.complete("j1", "worker-b", {"from": "b"}, ttl_s=60)
    assert ledger.claim("j1", "d1", "worker-c").result == {"from": "b"}


def test_renew_keeps_the_lease(client: redis.Redis, prefix: str) -> None:
    """A renewal moves the lease's end (Redis server time) later; only its holder can renew."""
    ledger = JtiLedger(client, prefix, lease_s=30)
    ledger.claim("j1", "d1", "worker-a")
    first_end = int(client.hget(ledger.key("j1"), "lease_until") or 0)
    poll(client.time, lambda now: now[0] * 1000 + now[1] // 1000 > first_end - 30_000)  # the server clock moved on
    assert ledger.renew("j1", "worker-a")
    assert int(client.hget(ledger.key("j1"), "lease_until") or 0) > first_end
    assert not ledger.renew("j1", "worker-b")
    assert ledger.claim("j1", "d1", "worker-b").status is ClaimStatus.HELD


def test_release_hands_back(client: redis.Redis, prefix: str) -> None:
    ledger = JtiLedger(client, prefix, lease_s=30)
    ledger.claim("j1", "d1", "worker-a")
    assert not ledger.release("j1", "worker-b")
    assert ledger.release("j1", "worker-a")
    assert not ledger.release("j1", "worker-a")
    again = ledger.claim("j1", "d1", "worker-b")
    assert again.status is ClaimStatus.TAKEN
    assert again.holder == "worker-b"
    assert ledger.claim("j1", "d2", "worker-c").status is ClaimStatus.MISMATCH


def test_concurrent_claims_take_once(client: redis.Redis, prefix: str) -> None:
    ledger = JtiLedger(client, prefix, lease_s=30)
    barrier = threading.Barrier(CONCURRENT_CLAIMERS)
    statuses: list[ClaimStatus] = []
    lock = threading.Lock()

    def claim(index: int) -> None:
        barrier.wait()
        outcome = ledger.claim("j1", "d1", f"worker-{index}")
        with lock:
            statuses.append(outcome.status)

    threads = [threading.Thread(target=claim, args=(i,)) for i in range(CONCURRENT_CLAIMERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert statuses.count(ClaimStatus.TAKEN) == 1
    assert statuses.count(ClaimStatus.HELD) == CONCURRENT_CLAIMERS - 1


def test_record_expiry(client: redis.Redis, prefix: str) -> None:
    ledger = JtiLedger(client, prefix, lease_s=1, memory_s=120)
    ledger.claim("j1", "d1", "worker-a")
    assert 110_000 < int(client.pttl(ledger.key("j1"))) <= 120_000
    ledger.claim("j2", "d1", "worker-a", memory_s=300)
    assert int(client.pttl(ledger.key("j2"))) > 290_000
    ledger.complete("j1", "worker-a", [1, 2], ttl_s=3600)
    assert int(client.pttl(ledger.key("j1"))) > 3_500_000
    short = JtiLedger(client, prefix, lease_s=0.05, memory_s=0.2)
    short.claim("j3", "d1", "worker-a")
    poll(lambda: short.peek("j3"), lambda record: record is None)  # forgotten once its memory ran out
    assert short.claim("j3", "d2", "worker-b").status is ClaimStatus.TAKEN


def test_keys_use_the_prefix(client: redis.Redis, prefix: str) -> None:
    ledger = JtiLedger(client, prefix)
    store = IdempotencyStore(client, prefix)
    assert ledger.key("j1") == f"{prefix}:jti:j1"
    assert store.key("scope", "k").startswith(f"{prefix}:idem:")
    assert len(store.key("scope", "k").rsplit(":", 1)[1]) == 64


def test_idempotency_outcomes(client: redis.Redis, prefix: str) -> None:
    store = IdempotencyStore(client, prefix)
    first = store.reserve("caller:chat", "key-1", "h1", "r1", ttl_s=60)
    assert first.status is IdemStatus.NEW
    assert first.request_id == "r1"
    assert store.reserve("caller:chat", "key-1", "h1", "r1", ttl_s=60).status is IdemStatus.SAME_REQUEST
    duplicate = store.reserve("caller:chat", "key-1", "h1", "r2", ttl_s=60)
    assert duplicate.status is IdemStatus.DUPLICATE
    assert duplicate.request_id == "r1"
    duplicate.raise_for_conflict()
    conflict = store.reserve("caller:chat", "key-1", "h2", "r3", ttl_s=60)
    assert conflict.status is IdemStatus.CONFLICT
    assert conflict.request_id == "r1"
    with pytest.raises(IdempotencyConflictError):
        conflict.raise_for_conflict()
    assert store.reserve("caller:embed", "key-1", "h2", "r4", ttl_s=60).status is IdemStatus.NEW
    assert store.reserve("other:chat", "key-1", "h2", "r5", ttl_s=60).status is IdemStatus.NEW


def test_idempotency_forget_and_expiry(client: redis.Redis, prefix: str) -> None:
    store = IdempotencyStore(client, prefix)
    store.reserve("s", "k", "h1", "r1", ttl_s=60)
    assert not store.forget("s", "k", "r2")
    assert store.forget("s", "k", "r1")
    assert store.reserve("s", "k", "h2", "r2", ttl_s=0.2).status is IdemStatus.NEW
    poll(lambda: client.exists(store.key("s", "k")), lambda exists: not exists)
    assert store.reserve("s", "k", "h3", "r3", ttl_s=60).status is IdemStatus.NEW


def test_lookup_and_wait_for_result(client: redis.Redis, prefix: str) -> None:
    ledger = JtiLedger(client, prefix, lease_s=30)
    assert ledger.lookup("j1") is None
    ledger.claim("j1", "d1", "worker-a")
    held = ledger.lookup("j1")
    assert held is not None
    assert held.status is ClaimStatus.HELD
    assert held.holder == "worker-a"
    assert ledger.wait_for_result("j1", timeout_s=0.1, poll_s=0.02) is None
    timer = threading.Timer(0.1, lambda: ledger.complete("j1", "worker-a", {"n": 1}, ttl_s=60))
    timer.start()
    done = ledger.wait_for_result("j1", timeout_s=2, poll_s=0.02)
    timer.join()
    assert done is not None
    assert done.result == {"n": 1}
    ledger.release("j1", "worker-a")
    assert ledger.lookup("j1") is not None
    ledger.claim("j2", "d1", "worker-a")
    ledger.release("j2", "worker-a")
    assert ledger.lookup("j2") is None
