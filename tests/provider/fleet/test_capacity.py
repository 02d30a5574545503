"""The capacity gate: thresholds, hysteresis, read pacing and read errors; then under real load on the simulator."""

from __future__ import annotations

import threading
from typing import Any

import httpx
import pytest

from provider.fleet.capacity import CapacityGate
from provider.settings import InstanceSettings, Settings
from provider.vllm.client import VllmClient
from provider.vllm.errors import ProviderConnectionError
from provider.vllm.models import MetricsSnapshot
from tests.conftest import wait_until

MAX_WAITING = 10
MAX_KV = 0.9
LOAD_REQUESTS = 3
LOAD_TTFT_S = 0.4
WAIT_LIMIT_S = 15.0  # a bound for a loaded host
POLL_S = 0.02


class FakeMetrics:
    """A metrics reader whose answer a test sets, counting reads; ``error`` makes the next reads fail."""

    def __init__(self) -> None:
        self.snapshot = MetricsSnapshot()
        self.error: Exception | None = None
        self.reads = 0

    def set(self, *, waiting: int = 0, kv: float | None = None) -> None:
        self.snapshot = MetricsSnapshot(waiting=waiting, kv_cache_usage=kv)

    def __call__(self) -> MetricsSnapshot:
        self.reads += 1
        if self.error is not None:
            raise self.error
        return self.snapshot


class FakeClock:
    """Monotonic seconds that move only when a test says so."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def metrics() -> FakeMetrics:
    return FakeMetrics()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def gate(metrics: FakeMetrics, clock: FakeClock, **options: Any) -> CapacityGate:
    settings: dict[str, Any] = {"max_waiting": MAX_WAITING, "max_kv_cache_usage": MAX_KV, "min_interval_s": 0.0}
    return CapacityGate(metrics, clock=clock, **{**settings, **options})


def test_pauses_above_waiting_threshold_not_at_it(metrics: FakeMetrics, clock: FakeClock) -> None:
    subject = gate(metrics, clock)
    metrics.set(waiting=MAX_WAITING)
    assert not subject.should_pause()
    metrics.set(waiting=MAX_WAITING + 1)
    assert subject.should_pause()
    assert subject.paused
    assert subject.last_snapshot is not None
    assert subject.last_snapshot.waiting == MAX_WAITING + 1


def test_pauses_above_kv_cache_threshold(metrics: FakeMetrics, clock: FakeClock) -> None:
    subject = gate(metrics, clock)
    metrics.set(kv=MAX_KV)
    assert not subject.should_pause()
    metrics.set(kv=0.95)
    assert subject.should_pause()


def test_waiting_hysteresis(metrics: FakeMetrics, clock: FakeClock) -> None:
    subject = gate(metrics, clock)
    metrics.set(waiting=11)
    assert subject.should_pause()
    for waiting in (10, 9):  # below the threshold, above 0.8 of it: stay paused
        metrics.set(waiting=waiting)
        assert subject.should_pause()
    metrics.set(waiting=8)
    assert not subject.should_pause()
    metrics.set(waiting=10)
    assert not subject.should_pause()


def test_kv_cache_hysteresis(metrics: FakeMetrics, clock: FakeClock) -> None:
    subject = gate(metrics, clock, max_waiting=None)
    metrics.set(kv=0.95)
    assert subject.should_pause()
    metrics.set(kv=0.8)
    assert subject.should_pause()
    metrics.set(kv=0.7)
    assert not subject.should_pause()


def test_resumes_only_when_every_gauge_recovered(metrics: FakeMetrics, clock: FakeClock) -> None:
    subject = gate(metrics, clock)
    metrics.set(waiting=20, kv=0.99)
    assert subject.should_pause()
    metrics.set(waiting=0, kv=0.85)
    assert subject.should_pause()
    metrics.set(waiting=9, kv=0.1)
    assert subject.should_pause()
    metrics.set(waiting=0, kv=0.1)
    assert not subject.should_pause()


def test_a_zero_waiting_threshold_still_resumes(metrics: FakeMetrics, clock: FakeClock) -> None:
    subject = gate(metrics, clock, max_waiting=0, max_kv_cache_usage=None)
    metrics.set(waiting=1)
    assert subject.should_pause()
    metrics.set(waiting=0)
    assert not subject.should_pause()


def test_unknown_kv_cache_usage_never_pauses(metrics: FakeMetrics, clock: FakeClock) -> None:
    subject = gate(metrics, clock, max_waiting=None)
    metrics.set(kv=None)
    assert not subject.should_pause()


def test_reads_at_most_once_per_interval(metrics: FakeMetrics, clock: FakeClock) -> None:
    subject = gate(metrics, clock, min_interval_s=1.0)
    metrics.set(waiting=50)
    assert subject.should_pause()
    metrics.set(waiting=0)
    for _ in range(10):
        clock.now += 0.09
        assert subject.should_pause()  # the cached decision
    assert metrics.reads == 1
    clock.now += 0.1
    assert not subject.should_pause()
    assert metrics.reads == 2


@pytest.mark.parametrize("paused_before", [False, True])
def test_a_read_error_changes_nothing(metrics: FakeMetrics, clock: FakeClock, paused_before: bool) -> None:
    subject = gate(metrics, clock, min_interval_s=1.0)
    metrics.set(waiting=50 if paused_before else 0)
    assert subject.should_pause() is paused_before
    metrics.error = ProviderConnectionError("refused")
    for _ in range(3):
        clock.now += 1.0
        assert subject.should_pause() is paused_before
    assert subject.read_errors == 3
    clock.now += 0.5
    assert subject.should_pause() is paused_before
    assert metrics.reads == 4  # a failed read also waits out the interval
    metrics.error = None
    metrics.set(waiting=50 if not paused_before else 0)
    clock.now += 1.0
    assert subject.should_pause() is not paused_before


def test_without_thresholds_never_reads(metrics: FakeMetrics, clock: FakeClock) -> None:
    subject = gate(metrics, clock, max_waiting=None, max_kv_cache_usage=None)
    metrics.set(waiting=1000, kv=1.0)
    assert not subject.enabled
    assert not subject.should_pause()
    assert metrics.reads == 0


def test_from_settings(metrics: FakeMetrics, clock: FakeClock) -> None:
    settings = Settings(
        pause_when_waiting_over=4,
        pause_when_kv_cache_over=0.5,
        capacity_check_interval_s=2.5,
        capacity_resume_ratio=0.5,
    )
    subject = CapacityGate.from_settings(metrics, settings, clock=clock)
    assert (subject.max_waiting, subject.max_kv_cache_usage) == (4, 0.5)
    assert (subject.min_interval_s, subject.resume_ratio) == (2.5, 0.5)
    assert not CapacityGate.from_settings(metrics, Settings()).enabled


@pytest.mark.parametrize(
    "options",
    [{"max_waiting": -1}, {"max_kv_cache_usage": 1.5}, {"min_interval_s": -1}, {"resume_ratio": 0}],
)
def test_refuses_settings_that_cannot_work(metrics: FakeMetrics, clock: FakeClock, options: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        gate(metrics, clock, **options)


# --- against the simulator --------------------------------------------------------------------------------


def wait_for(condition: Any, what: str) -> None:
    wait_until(condition, WAIT_LIMIT_S, what, interval_s=POLL_S)


@pytest.mark.integration
def test_pauses_under_load_and_resumes_after(sim: Any) -> None:
    sim.configure(max_running=1, ttft_s=LOAD_TTFT_S)
    model = sim.config()["models"][0]["name"]
    with VllmClient(InstanceSettings(name="sim", base_url=sim.url)) as client:
        subject = CapacityGate(client.metrics, max_waiting=1, max_kv_cache_usage=None, min_interval_s=0.0)
        assert not subject.should_pause()

        def chat() -> None:
            body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
            httpx.post(f"{sim.url}/v1/chat/completions", json=body, timeout=WAIT_LIMIT_S * 2)

        load = [threading.Thread(target=chat) for _ in range(LOAD_REQUESTS)]
        for thread in load:
            thread.start()
        wait_for(subject.should_pause, "the gate to pause under load")
        assert subject.last_snapshot is not None
        assert subject.last_snapshot.waiting > 1
        for thread in load:
            thread.join(WAIT_LIMIT_S * 2)
        wait_for(lambda: not subject.should_pause(), "the gate to resume after the load")
        assert subject.last_snapshot.waiting == 0
