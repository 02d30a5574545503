"""The shared circuit breaker and latency tracker against a real Redis (db 15, one key prefix per test)."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator

import pytest
import redis

from provider.fleet.events import RegistryEvent
from provider.fleet.health import HEALTH_KEY_TTL_S, MAX_ERROR_CODE_CHARS, HealthTracker, InstanceHealth
from provider.fleet.redis_keys import RedisKeys
from provider.settings import Settings
from tests.conftest import REDIS_HOST, REDIS_PORT, require_server

REDIS_DB = 15
INSTANCE = "gpu1"
START_S = 1_700_000_000.0
HALF_OPEN_AFTER_S = 60.0
CONCURRENT_CALLERS = 16


class FakeClock:
    """Epoch seconds that move only when a test says so."""

    def __init__(self) -> None:
        self.now = START_S

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture(params=[False, True], ids=["bytes", "decoded"])
def client(request: pytest.FixtureRequest) -> Iterator[redis.Redis]:
    require_server("Redis", REDIS_HOST, REDIS_PORT)
    connection = redis.Redis(
        host=REDIS_HOST, port=REDIS_PORT, db=REDIS_DB, decode_responses=bool(request.param), socket_timeout=2
    )
    yield connection
    connection.close()


@pytest.fixture
def keys(client: redis.Redis) -> Iterator[RedisKeys]:
    prefix = f"test-health-{uuid.uuid4().hex}"
    yield RedisKeys(prefix)
    stale = list(client.scan_iter(match=f"{prefix}:*", count=500))
    if stale:
        client.delete(*stale)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def tracker(client: redis.Redis, keys: RedisKeys, clock: FakeClock) -> HealthTracker:
    return HealthTracker(client, keys, failure_threshold=3, half_open_after_s=HALF_OPEN_AFTER_S, clock=clock)


def open_circuit(tracker: HealthTracker) -> None:
    for _ in range(tracker.failure_threshold):
        tracker.record_failure(INSTANCE, "server_busy")


# --- circuit ----------------------------------------------------------------------------------------------


def test_unknown_instance_is_closed_and_allowed(tracker: HealthTracker) -> None:
    assert tracker.state(INSTANCE) == InstanceHealth(instance=INSTANCE)
    assert tracker.allow(INSTANCE)


def test_opens_after_three_consecutive_failures(tracker: HealthTracker) -> None:
    assert tracker.record_failure(INSTANCE, "server_busy") == "closed"
    assert tracker.record_failure(INSTANCE, "timeout") == "closed"
    assert tracker.allow(INSTANCE)
    assert tracker.record_failure(INSTANCE, "connection_error") == "open"
    health = tracker.state(INSTANCE)
    assert health.circuit == "open"
    assert health.consecutive_failures == 3
    assert health.opened_at == START_S
    assert health.retry_after_s == HALF_OPEN_AFTER_S
    assert health.last_error == "connection_error"
    assert not health.available
    assert not tracker.allow(INSTANCE)


def test_a_success_resets_the_failure_count(tracker: HealthTracker) -> None:
    tracker.record_failure(INSTANCE, "timeout")
    tracker.record_failure(INSTANCE, "timeout")
    tracker.record_success(INSTANCE, 0.1)
    tracker.record_failure(INSTANCE, "timeout")
    tracker.record_failure(INSTANCE, "timeout")
    health = tracker.state(INSTANCE)
    assert (health.circuit, health.consecutive_failures) == ("closed", 2)


def test_half_open_after_the_interval_grants_one_probe_across_threads(tracker: HealthTracker, clock: FakeClock) -> None:
    open_circuit(tracker)
    clock.advance(HALF_OPEN_AFTER_S - 0.1)
    assert not tracker.allow(INSTANCE)
    clock.advance(0.1)
    before = tracker.state(INSTANCE)
    assert (before.circuit, before.available, before.probe_in_flight) == ("half_open", True, False)

    barrier = threading.Barrier(CONCURRENT_CALLERS)
    granted: list[bool] = []
    lock = threading.Lock()

    def call() -> None:
        barrier.wait()
        answer = tracker.allow(INSTANCE)
        with lock:
            granted.append(answer)

    threads = [threading.Thread(target=call) for _ in range(CONCURRENT_CALLERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(5)
    assert len(granted) == CONCURRENT_CALLERS
    assert granted.count(True) == 1
    after = tracker.state(INSTANCE)
    assert (after.circuit, after.probe_in_flight, after.available) == ("half_open", True, False)
    assert not tracker.allow(INSTANCE)


def test_probe_success_closes_the_circuit(tracker: HealthTracker, clock: FakeClock) -> None:
    open_circuit(tracker)
    clock.advance(HALF_OPEN_AFTER_S)
    assert tracker.allow(INSTANCE)
    assert tracker.record_success(INSTANCE, 0.2) == "closed"
    health = tracker.state(INSTANCE)
    assert (health.circuit, health.consecutive_failures, health.opened_at) == ("closed", 0, None)
    assert all(tracker.allow(INSTANCE) for _ in range(5))


def test_probe_failure_reopens_for_another_interval(tracker: HealthTracker, clock: FakeClock) -> None:
    open_circuit(tracker)
    clock.advance(HALF_OPEN_AFTER_S)
    assert tracker.allow(INSTANCE)
    assert tracker.record_failure(INSTANCE, "server_error") == "open"
    health = tracker.state(INSTANCE)
    assert health.circuit == "open"
    assert health.opened_at == START_S + HALF_OPEN_AFTER_S
    clock.advance(HALF_OPEN_AFTER_S - 1)
    assert not tracker.allow(INSTANCE)
    clock.advance(1)
    assert tracker.allow(INSTANCE)


def test_late_failures_while_open_do_not_extend_it(tracker: HealthTracker, clock: FakeClock) -> None:
    open_circuit(tracker)
    clock.advance(10)
    assert tracker.record_failure(INSTANCE, "timeout") == "open"
    assert tracker.state(INSTANCE).opened_at == START_S
    clock.advance(HALF_OPEN_AFTER_S - 10)
    assert tracker.allow(INSTANCE)


def test_a_probe_that_never_reports_frees_the_slot(client: redis.Redis, keys: RedisKeys, clock: FakeClock) -> None:
    tracker = HealthTracker(client, keys, half_open_after_s=HALF_OPEN_AFTER_S, probe_timeout_s=5, clock=clock)
    open_circuit(tracker)
    clock.advance(HALF_OPEN_AFTER_S)
    assert tracker.allow(INSTANCE)
    clock.advance(4.9)
    assert not tracker.allow(INSTANCE)
    clock.advance(0.1)
    assert tracker.allow(INSTANCE)


def test_workers_share_one_state(client: redis.Redis, keys: RedisKeys, clock: FakeClock) -> None:
    worker_a = HealthTracker(client, keys, clock=clock)
    worker_b = HealthTracker(client, keys, clock=clock)
    worker_a.record_failure(INSTANCE, "timeout")
    worker_b.record_failure(INSTANCE, "timeout")
    worker_a.record_failure(INSTANCE, "timeout")
    assert not worker_b.allow(INSTANCE)
    assert worker_b.state("gpu2").circuit == "closed"


# --- latency and penalty ----------------------------------------------------------------------------------


def test_rolling_latency_keeps_the_last_window(client: redis.Redis, keys: RedisKeys, clock: FakeClock) -> None:
    tracker = HealthTracker(client, keys, latency_window=4, clock=clock)
    for latency_s in (0.1, 0.9, 0.2, 0.5):
        tracker.record_success(INSTANCE, latency_s)
    health = tracker.state(INSTANCE)
    assert health.latency_samples == 4
    assert health.latency_avg_s == pytest.approx(0.425)
    assert health.latency_p50_s == pytest.approx(0.35)
    tracker.record_success(INSTANCE, 0.3)  # 0.1 leaves the window
    health = tracker.state(INSTANCE)
    assert health.latency_samples == 4
    assert health.latency_avg_s == pytest.approx(0.475)
    assert health.latency_p50_s == pytest.approx(0.4)
    assert health.penalty == 0.0


def test_odd_window_median(client: redis.Redis, keys: RedisKeys, clock: FakeClock) -> None:
    tracker = HealthTracker(client, keys, latency_window=3, clock=clock)
    for latency_s in (3.0, 1.0, 2.0):
        tracker.record_success(INSTANCE, latency_s)
    assert tracker.state(INSTANCE).latency_p50_s == pytest.approx(2.0)


def test_penalty_grows_past_the_latency_threshold(client: redis.Redis, keys: RedisKeys, clock: FakeClock) -> None:
    tracker = HealthTracker(client, keys, latency_window=2, latency_threshold_s=1.0, clock=clock)
    tracker.record_success(INSTANCE, 0.5)
    tracker.record_success(INSTANCE, 1.5)
    assert tracker.state(INSTANCE).penalty == 0.0  # the mean (1.0) is within the threshold
    tracker.record_success(INSTANCE, 2.5)
    health = tracker.state(INSTANCE)
    assert health.latency_avg_s == pytest.approx(2.0)
    assert health.penalty == pytest.approx(1.0)
    tracker.record_success(INSTANCE, 0.1)
    tracker.record_success(INSTANCE, 0.1)
    assert tracker.state(INSTANCE).penalty == 0.0


def test_no_threshold_no_penalty(tracker: HealthTracker) -> None:
    tracker.record_success(INSTANCE, 120.0)
    assert tracker.state(INSTANCE).penalty == 0.0


# --- storage, safety, settings ----------------------------------------------------------------------------


def test_the_hash_expires_and_reset_forgets(tracker: HealthTracker, client: redis.Redis, keys: RedisKeys) -> None:
    tracker.record_failure(INSTANCE, "timeout")
    ttl_s = client.ttl(keys.health(INSTANCE))
    assert 0 < ttl_s <= HEALTH_KEY_TTL_S
    tracker.reset(INSTANCE)
    assert client.exists(keys.health(INSTANCE)) == 0


def test_error_codes_are_scrubbed_and_short(tracker: HealthTracker) -> None:
    tracker.record_failure(INSTANCE, "connect to http://10.0.0.5:8000/v1 failed: Bearer sk-abc")
    last_error = tracker.state(INSTANCE).last_error
    assert last_error is not None
    assert "http" not in last_error
    assert "sk-abc" not in last_error
    tracker.record_failure(INSTANCE, "x" * 500)
    assert len(tracker.state(INSTANCE).last_error or "") == MAX_ERROR_CODE_CHARS


def test_health_fits_in_a_registry_event(tracker: HealthTracker, clock: FakeClock) -> None:
    tracker.record_success(INSTANCE, 0.25)
    open_circuit(tracker)
    event = RegistryEvent.degraded(
        {"offering_id": "vllm:gpu1:inference:qwen3-6-27b", "model": "qwen3-6-27b"},
        health=tracker.state(INSTANCE).to_dict(),
    )
    assert event.health is not None
    assert event.health["circuit"] == "open"


def test_from_settings(client: redis.Redis, keys: RedisKeys, clock: FakeClock) -> None:
    settings = Settings(
        key_prefix=keys.prefix,
        circuit_failure_threshold=2,
        circuit_half_open_after_s=5.0,
        latency_window=7,
        latency_penalty_threshold_s=0.5,
    )
    tracker = HealthTracker.from_settings(client, settings, clock=clock)
    assert (tracker.failure_threshold, tracker.half_open_after_s) == (2, 5.0)
    assert (tracker.latency_window, tracker.latency_threshold_s) == (7, 0.5)
    tracker.record_failure(INSTANCE, "timeout")
    assert tracker.record_failure(INSTANCE, "timeout") == "open"
    assert client.exists(keys.health(INSTANCE)) == 1


@pytest.mark.parametrize(
    "options",
    [
        {"failure_threshold": 0},
        {"half_open_after_s": -1},
        {"latency_window": 0},
        {"latency_threshold_s": 0},
    ],
)
def test_refuses_settings_that_cannot_work(client: redis.Redis, keys: RedisKeys, options: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        HealthTracker(client, keys, **options)  # type: ignore[arg-type]


def test_refuses_a_negative_latency(tracker: HealthTracker) -> None:
    with pytest.raises(ValueError):
        tracker.record_success(INSTANCE, -0.1)
