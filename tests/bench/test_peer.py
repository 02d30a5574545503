"""The benchmark's peer column for real: the plain Celery task's worker processes, its chat and stream callers
and a load-generator run against a simulator process, on the tests' Redis databases."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

from bench.peer import build_app, peer_worker_env, reply_fields
from bench.procs import Simulator, start_peer_worker, start_simulator
from bench.scenarios import (
    CHAT_MODEL,
    OUTPUT_TOKENS,
    Peer,
    Sanity,
    _peer_stream,
    _run_load,
    _wait_for_peer,
    expected_answers,
)
from tests.conftest import BACKEND_DB, BROKER_DB, STATE_DB


@pytest.fixture(scope="module")
def simulator() -> Iterator[Simulator]:
    sim = start_simulator("test-peer-sim", [CHAT_MODEL], output_tokens=OUTPUT_TOKENS)
    try:
        yield sim
    finally:
        sim.stop()


@pytest.fixture
def peer(redis_url: str, simulator: Simulator) -> Iterator[Peer]:
    """The peer's worker as the benchmark sizes it for N = 4 on two processes, and a caller app."""
    broker, backend, streams = (f"{redis_url}/{db}" for db in (BROKER_DB, BACKEND_DB, STATE_DB))
    worker = start_peer_worker(peer_worker_env(broker, backend, simulator.url, streams, 4), "test-peer", 4, 2)
    caller = Peer(worker, build_app(broker, backend), broker, backend)
    try:
        _wait_for_peer(caller, CHAT_MODEL)
        yield caller
    finally:
        worker.stop()
        caller.app.close()


def test_the_peer_answers_chats_and_streams_like_vllm_does(redis_url: str, simulator: Simulator, peer: Peer) -> None:
    expected = expected_answers(simulator.url, CHAT_MODEL)
    assert reply_fields(peer.chat(CHAT_MODEL, 3)) == (expected["3"], OUTPUT_TOKENS, "stop")
    store = redis.Redis.from_url(f"{redis_url}/{STATE_DB}")
    try:
        ttft, gaps, text, usage, finish = _peer_stream(peer, store, CHAT_MODEL, 2)
    finally:
        store.close()
    assert (text, usage, finish) == (expected["2"], OUTPUT_TOKENS, "stop")
    assert ttft > 0
    assert len(gaps) >= 1  # the chunks came one by one, not as one answer
    assert len(peer.worker.processes) == 2
    assert all(proc.alive() for proc in peer.worker.processes)


def test_a_peer_load_run_counts_its_requests_and_the_cpu_of_each_side(simulator: Simulator, peer: Peer) -> None:
    expected = expected_answers(simulator.url, CHAT_MODEL)
    sanity = Sanity()
    run = _run_load("peer", 4, 1.0, simulator, None, expected, peer.worker.pids(), sanity, "test-peer-load", peer)
    tally = sanity.of("peer")
    assert tally.passed, tally.problems  # the peer's requests are counted apart from the fleet's
    assert sanity.requests == 0 < run["completed"] <= tally.requests
    assert run["completed"] > 0
    assert run["errors"] == 0
    assert run["wrong"] == 0
    assert run["cpu_per_request_ms"]["worker"]["value"] > 0
    assert run["cpu_per_request_ms"]["caller"]["value"] > 0
    assert 1 <= len(run["worker_process_cores"]["value"]) <= 2
