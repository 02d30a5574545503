"""The measurements: overhead, throughput, streaming, relay rate, envelope cost, lanes and backlog.

Each function starts what it needs (a simulator, a worker, load generators), stops it in ``finally``, checks
every answer it gets (``Sanity``), and returns a JSON-ready dict whose figures carry their units.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from bench.fleet import (
    BACKEND_DB,
    MAX_TOKENS,
    REDIS_BASE,
    STATE_DB,
    FleetUnderTest,
    bench_security,
    bench_settings,
    chat_messages,
    chat_request,
    configure_producer,
    start_fleet,
    worker_env,
)
from bench.load import check_answer
from bench.peer import CHAT_TASK, STREAM_TASK, build_app, new_stream_key, peer_worker_env, read_stream, reply_fields
from bench.procs import (
    CpuMeter,
    Managed,
    PeerWorker,
    Simulator,
    server_pids,
    start_peer_worker,
    start_simulator,
    start_worker,
)
from bench.stats import gaps_ms, paired_differences, percentile, rate, summarize
from provider.settings import InstanceSettings, Settings
from provider.sizing import default_process_count
from provider.vllm.client import VllmClient

__all__ = [
    "CHAT_MODEL",
    "Sanity",
    "measure_backlog",
    "measure_codec",
    "measure_lanes",
    "measure_overhead",
    "measure_relay",
    "measure_streaming",
    "measure_throughput",
]

CHAT_MODEL = "bench-chat"
OUTPUT_TOKENS = 16
PROMPTS = 8
CALLERS_PER_PROCESS = 32
LOAD_READY_TIMEOUT_S = 120.0
RESULT_TIMEOUT_S = 60.0
MB = 1024 * 1024
BACKLOG_CONTEXT = 32768


@dataclass
class Sanity:
    """Every request the benchmark made, and every one that failed or came back wrong.

    The plain Celery peer's requests are counted apart, in ``peer`` (``of("peer")``): the peer is what a user
    writes in twenty lines, so its failures are a finding the report shows, not a failure of the run; the
    fleet's and direct's failures fail it (``passed``).
    """

    requests: int = 0
    failed: int = 0
    wrong: int = 0
    problems: list[str] = field(default_factory=list)
    peer: Sanity | None = None

    def of(self, kind: str) -> Sanity:
        """The tally for requests of ``kind`` (``peer``: the peer's own, created on first use; else this one)."""
        if kind != "peer":
            return self
        if self.peer is None:
            self.peer = Sanity()
        return self.peer

    def ok(self, count: int = 1) -> None:
        """Count ``count`` good answers."""
        self.requests += count

    def fail(self, where: str, problem: str, *, wrong: bool = False) -> None:
        """Count one failed (or wrong) request and keep its description."""
        self.requests += 1
        if wrong:
            self.wrong += 1
        else:
            self.failed += 1
        if len(self.problems) < 20:
            self.problems.append(f"{where}: {problem}")

    def check(self, where: str, content: Any, tokens: Any, finish: Any, expected: str) -> bool:
        """Count one answer as good or wrong."""
        problem = check_answer(content, tokens, finish, expected, OUTPUT_TOKENS)
        if problem is None:
            self.ok()
            return True
        self.fail(where, problem, wrong=True)
        return False

    @property
    def passed(self) -> bool:
        """No failure and no wrong answer, and at least one request made."""
        return self.requests > 0 and self.failed == 0 and self.wrong == 0

    def as_dict(self) -> dict[str, Any]:
        """The JSON form (the peer's tally under ``peer``, without a verdict of its own)."""
        data: dict[str, Any] = {
            "requests": self.requests,
            "failed": self.failed,
            "wrong": self.wrong,
            "passed": self.passed,
            "problems": self.problems,
        }
        if self.peer is not None:
            data["peer"] = {key: value for key, value in self.peer.as_dict().items() if key != "passed"}
        return data


def direct_client(sim_url: str, concurrency: int = 4) -> VllmClient:
    """The provider client straight to the simulator."""
    return VllmClient(InstanceSettings(name="bench-direct", base_url=sim_url, concurrency=concurrency))


def expected_answers(sim_url: str, model: str, prompts: int = PROMPTS) -> dict[str, str]:
    """Each prompt's answer, asked straight from the simulator (lorem text is seeded by the prompt)."""
    with direct_client(sim_url) as client:
        return {str(i): client.chat(chat_request(model, i)).content or "" for i in range(prompts)}


def _reply_fields(reply: dict[str, Any]) -> tuple[Any, Any, Any]:
    return reply.get("content"), (reply.get("usage") or {}).get("completion_tokens"), reply.get("finish_reason")


@contextmanager
def _fleet(
    settings: Settings, models: list[str], name: str, concurrency: int, processes: int = 1
) -> Iterator[FleetUnderTest]:
    fleet = start_fleet(settings, models, name=name, concurrency=concurrency, processes=processes)
    try:
        yield fleet
    finally:
        fleet.stop()


@dataclass
class Peer:
    """The plain Celery task's worker, and a caller app of this process for its broker."""

    worker: PeerWorker
    app: Any
    broker_url: str
    result_backend: str

    def chat(self, model: str, index: int, max_tokens: int = MAX_TOKENS) -> dict[str, Any]:
        """``chat.delay(body).get()``: one chat through the peer."""
        body = {"model": model, "messages": chat_messages(index), "max_tokens": max_tokens}
        reply: dict[str, Any] = self.app.tasks[CHAT_TASK].delay(body).get(timeout=RESULT_TIMEOUT_S)
        return reply


def peer_env(broker_url: str, sim_url: str, slots: int) -> dict[str, str]:
    """The peer worker's settings: the fleet's broker, the results and state databases of the benchmark."""
    return peer_worker_env(broker_url, f"{REDIS_BASE}/{BACKEND_DB}", sim_url, f"{REDIS_BASE}/{STATE_DB}", slots)


def _wait_for_peer(peer: Peer, model: str) -> None:
    """Until every peer process answers a ping, then two warm-up chats per process."""
    deadline = time.monotonic() + LOAD_READY_TIMEOUT_S
    wanted = set(peer.worker.names)
    while True:
        if not peer.worker.alive():
            raise RuntimeError(f"the peer worker exited: {peer.worker.log_tail()}")
        replies = peer.app.control.ping(timeout=0.5) or []
        answering = {node.partition("@")[0] for reply in replies for node in reply}
        if wanted <= answering:
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"the peer worker did not start: {peer.worker.log_tail()}")
    for i in range(2 * len(wanted)):
        peer.chat(model, i % PROMPTS)


@contextmanager
def _peer(broker_url: str, sim: Simulator, name: str, concurrency: int, processes: int = 1) -> Iterator[Peer]:
    worker = start_peer_worker(peer_env(broker_url, sim.url, concurrency), name, concurrency, processes)
    backend = f"{REDIS_BASE}/{BACKEND_DB}"
    peer = Peer(worker, build_app(broker_url, backend), broker_url, backend)
    try:
        _wait_for_peer(peer, CHAT_MODEL)
        yield peer
    finally:
        worker.stop()
        peer.app.close()


# -- 1. overhead ----------------------------------------------------------------------------------------


def _paired_run(
    sim_url: str, models: list[str], requests: int, sanity: Sanity, where: str, peer: Peer | None = None
) -> dict[str, list[float]]:
    """One direct, one fleet (and one peer) request, ``requests`` times, the fleet and peer order alternating;
    every answer must equal the direct one. Latencies and the caller's CPU time per call, in ms."""
    from tasks import chat

    samples: dict[str, list[float]] = {
        key: [] for key in ("direct", "fleet", "peer", "direct_cpu", "fleet_cpu", "peer_cpu")
    }

    def fleet_call(model: str, index: int) -> tuple[Any, Any, Any]:
        reply = chat.delay(model=model, messages=chat_messages(index), max_tokens=MAX_TOKENS).get(
            timeout=RESULT_TIMEOUT_S
        )
        return _reply_fields(reply)

    def peer_call(model: str, index: int) -> tuple[Any, Any, Any]:
        assert peer is not None
        return reply_fields(peer.chat(model, index))

    with direct_client(sim_url) as client:
        for i in range(requests):
            model = models[i % len(models)]
            index = i % PROMPTS
            cpu = time.process_time()
            started = time.perf_counter()
            try:
                answer = client.chat(chat_request(model, index))
            except Exception as exc:
                sanity.fail(where, f"direct: {type(exc).__name__}: {exc}")
                continue
            timing = {"direct": ((time.perf_counter() - started) * 1000.0, (time.process_time() - cpu) * 1000.0)}
            tokens = answer.usage.completion_tokens if answer.usage else None
            if not sanity.check(where + " direct", answer.content, tokens, answer.finish_reason, answer.content or ""):
                continue
            calls = [("fleet", fleet_call), ("peer", peer_call)][: 2 if peer is not None else 1]
            if i % 2:
                calls.reverse()
            good = True
            for kind, call in calls:
                cpu = time.process_time()
                started = time.perf_counter()
                try:
                    fields = call(model, index)
                except Exception as exc:
                    sanity.of(kind).fail(where, f"{kind}: {type(exc).__name__}: {exc}")
                    good = False
                    break
                timing[kind] = ((time.perf_counter() - started) * 1000.0, (time.process_time() - cpu) * 1000.0)
                if not sanity.of(kind).check(f"{where} {kind}", *fields, answer.content or ""):
                    good = False
                    break
            if not good:
                continue
            for kind, (latency, cpu_ms) in timing.items():
                samples[kind].append(latency)
                samples[f"{kind}_cpu"].append(cpu_ms)
    return samples


def _overhead_figures(samples: dict[str, list[float]]) -> dict[str, Any]:
    direct, fleet = samples["direct"], samples["fleet"]
    if not direct:
        return {"pairs": 0}
    figures: dict[str, Any] = {
        "pairs": len(direct),
        "method": "paired: direct, fleet and peer requests interleaved one by one; added = X - direct per round",
        "direct_ms": summarize(direct),
        "fleet_ms": summarize(fleet),
        "added_ms": summarize(paired_differences(direct, fleet)),
        "added_p50_of_distributions_ms": percentile(fleet, 50) - percentile(direct, 50),
    }
    peer = samples.get("peer") or []
    if peer:
        figures["peer_ms"] = summarize(peer)
        figures["peer_added_ms"] = summarize(paired_differences(direct, peer))
    caller = {kind: samples.get(f"{kind}_cpu") or [] for kind in ("direct", "peer", "fleet")}
    figures["caller_cpu_per_request_ms"] = {
        kind: {"value": sum(values) / len(values), "unit": "ms"} for kind, values in caller.items() if values
    }
    return figures


def measure_overhead(broker_url: str, requests: int, sanity: Sanity, *, label: str) -> dict[str, Any]:
    """Zero-latency simulator; the same chat straight to it, through ``chat.delay().get()`` and through the
    plain Celery peer, interleaved."""
    sim = start_simulator(f"sim-overhead-{label}", [CHAT_MODEL])
    try:
        settings = bench_settings(broker_url, sim.url, bench_security(), concurrency=8)
        with (
            _fleet(settings, [CHAT_MODEL], f"bench-overhead-{label}", 8) as fleet,
            _peer(broker_url, sim, f"bench-peer-overhead-{label}", 8) as peer,
        ):
            _paired_run(sim.url, [CHAT_MODEL], min(50, requests), sanity, f"warm-up[{label}]", peer)
            meter = _meter(sim, {"worker": fleet.worker.pids(), "peer_worker": peer.worker.pids()}, [])
            meter.start()
            samples = _paired_run(sim.url, [CHAT_MODEL], requests, sanity, f"overhead[{label}]", peer)
            cpu = meter.stop()
            done = max(1, len(samples["fleet"]))
            cpu_per_request = {
                name: {"value": value * meter.wall_s / done * 1000.0, "unit": "ms"}
                for name, value in cpu.items()
                if name in ("worker", "peer_worker", "redis", "rabbitmq", "simulator")
            }
            result = _overhead_figures(samples)
            result["cpu_per_request_ms"] = cpu_per_request
            result["worker_cpu_per_request_ms"] = {
                "fleet": cpu_per_request["worker"],
                "peer": cpu_per_request["peer_worker"],
            }
            result["note"] = (
                "worker CPU per request: each worker's CPU time over the interleaved run divided by its requests "
                "(the fleet's and the peer's counts are equal); caller CPU: this process's CPU time around each "
                "call; the simulator's and the servers' serve all three kinds"
            )
            return result
    finally:
        sim.stop()


def _cores_figure(cpu: dict[str, float]) -> dict[str, Any]:
    """CPU use per process group over a run, in cores (1.0 = one core busy the whole time)."""
    return {"unit": "cores", **{name: round(value, 3) for name, value in cpu.items()}}


def _meter(
    sim: Simulator, workers: dict[str, list[int]], load: list[Managed], *, per_process: bool = False
) -> CpuMeter:
    """Cores busy of the simulator, the servers, the load generators and each named worker (``per_process``: also
    each worker process on its own, under ``details``)."""
    servers = server_pids()
    groups: dict[str, list[int]] = {
        "simulator": [sim.managed.pid],
        "redis": servers["redis"],
        "rabbitmq": servers["rabbitmq"],
        "load": [proc.pid for proc in load],
        **workers,
    }
    details = {str(pid): [pid] for pids in workers.values() for pid in pids} if per_process else {}
    return CpuMeter(groups, details)


# -- 2. throughput --------------------------------------------------------------------------------------


def worker_processes_for(callers: int) -> int:
    """Worker processes for ``callers`` in flight: ``vllm-fleet worker``'s default for an instance of that
    concurrency on this machine (``provider.sizing.default_process_count``)."""
    return default_process_count([callers])


def _run_load(
    mode: str,
    callers: int,
    seconds: float,
    sim: Simulator,
    settings: Settings | None,
    expected: dict[str, str],
    worker_pids: list[int],
    sanity: Sanity,
    where: str,
    peer: Peer | None = None,
) -> dict[str, Any]:
    """``callers`` closed-loop callers (``mode`` direct, fleet or peer) over load-generator processes for
    ``seconds``; ``worker_pids`` are the serving worker's processes (measured apart)."""
    processes = max(1, -(-callers // CALLERS_PER_PROCESS))
    shares = [callers // processes + (1 if i < callers % processes else 0) for i in range(processes)]
    env = worker_env(settings) if settings is not None else {}
    load: list[Managed] = []
    try:
        for i, share in enumerate(shares):
            proc = Managed(
                f"load-{mode}-{callers}-{i}",
                [sys.executable, "-m", "bench.load"],
                env=env,
                stdout=subprocess.PIPE,
                stdin=subprocess.PIPE,
            )
            load.append(proc)
            config = {
                "mode": mode,
                "callers": share,
                "sim_url": sim.url,
                "model": CHAT_MODEL,
                "expected": expected,
                "completion_tokens": OUTPUT_TOKENS,
                "max_tokens": MAX_TOKENS,
            }
            if peer is not None:
                config |= {"broker_url": peer.broker_url, "result_backend": peer.result_backend}
            assert proc.process.stdin is not None
            proc.process.stdin.write(json.dumps(config) + "\n")
            proc.process.stdin.flush()
        for proc in load:
            line = _readline(proc, LOAD_READY_TIMEOUT_S)
            if line.strip() != "READY":
                raise RuntimeError(f"load generator {proc.name} did not start: {line!r} {proc.log_tail()}")
        start_at = time.time() + 0.3
        end_at = start_at + seconds
        for proc in load:
            assert proc.process.stdin is not None
            proc.process.stdin.write(f"GO {start_at} {end_at}\n")
            proc.process.stdin.flush()
        meter = _meter(sim, {"worker": worker_pids}, load, per_process=True)
        time.sleep(max(0.0, start_at - time.time()))
        meter.start()
        time.sleep(max(0.0, end_at - time.time()))
        cpu = meter.stop()
        reports = [json.loads(_readline(proc, RESULT_TIMEOUT_S + 30)) for proc in load]
    finally:
        for proc in load:
            proc.stop(grace_s=5.0)
    completed = sum(r["completed"] for r in reports)
    errors = sum(r["error_count"] for r in reports)
    wrong = sum(r["wrong_count"] for r in reports)
    total = sum(r["total"] for r in reports)
    latencies = [value for r in reports for value in r["latencies_ms"]]
    tally = sanity.of(mode)
    tally.ok(total - errors - wrong)
    for report in reports:
        for problem in report["errors"]:
            if len(tally.problems) < 20:
                tally.problems.append(f"{where} {mode}: {problem}{_task_state(problem)}")
    tally.requests += errors + wrong
    tally.failed += errors
    tally.wrong += wrong
    per_process = [r["cpu_s"] / seconds for r in reports]
    done = max(1, completed)
    return {
        "requests_per_s": {"value": rate(completed, seconds), "unit": "req/s"},
        "closed_loop_requests_per_s": {
            "value": callers / (sum(latencies) / len(latencies) / 1000.0) if latencies else 0.0,
            "unit": "req/s",
            "method": "Little's law for closed-loop callers: N / mean latency (no quantization to whole rounds)",
        },
        "completed": completed,
        "latency_ms": summarize(latencies),
        "cpu_cores": _cores_figure(cpu),
        "worker_process_cores": {
            "unit": "cores",
            "value": sorted((round(v, 3) for v in meter.detail_result.values() if v >= 0.005), reverse=True),
        },
        "cpu_per_request_ms": {
            "worker": {"value": cpu.get("worker", 0.0) * meter.wall_s / done * 1000.0, "unit": "ms"},
            "caller": {"value": sum(r["cpu_s"] for r in reports) / done * 1000.0, "unit": "ms"},
        },
        "load_processes": processes,
        "load_process_max_cores": {"value": max(per_process), "unit": "cores"},
        "errors": errors,
        "wrong": wrong,
    }


def _task_state(problem: str) -> str:
    """For a failed fleet call, what the result backend and the jti ledger hold for its task (diagnosis)."""
    match = re.search(r"\[task ([0-9a-f]+)\]", problem)
    if match is None:
        return ""
    try:
        from tasks.app import app
        from tasks.runtime import runtime

        task_id = match.group(1)
        meta = app.backend.get_task_meta(task_id)
        ledger = runtime().ledger.peek(task_id)
        state = ledger.get("state") if ledger else None
        return f" (backend: {meta.get('status')}; ledger: {state})"
    except Exception as exc:
        return f" (state unknown: {type(exc).__name__})"


def _readline(proc: Managed, timeout_s: float) -> str:
    """One line from a child's stdout, or a RuntimeError after ``timeout_s``."""
    assert proc.process.stdout is not None
    box: list[str] = []
    reader = threading.Thread(target=lambda: box.append(proc.process.stdout.readline()), daemon=True)  # type: ignore[union-attr]
    reader.start()
    reader.join(timeout_s)
    if not box:
        raise RuntimeError(f"{proc.name} said nothing for {timeout_s} s: {proc.log_tail()}")
    return box[0]


def measure_throughput(
    broker_url: str, levels: list[int], seconds: float, sanity: Sanity, *, label: str
) -> dict[str, Any]:
    """Direct, plain Celery peer and fleet req/s at each concurrency N, each worker sized for it (N slots over
    the same number of processes, ``worker_processes_for``); only the worker under load runs."""
    sim = start_simulator(f"sim-throughput-{label}", [CHAT_MODEL], ttft_ms=100, itl_ms=20, output_tokens=OUTPUT_TOKENS)
    results: dict[str, Any] = {
        "simulator": {"ttft_ms": 100, "itl_ms": 20, "output_tokens": OUTPUT_TOKENS, "max_running": 1024},
        "window_s": seconds,
        "levels": {},
    }
    security = bench_security()
    try:
        expected = expected_answers(sim.url, CHAT_MODEL)
        for n in levels:
            where = f"throughput[{label}, N={n}]"
            processes = worker_processes_for(n)
            with _peer(broker_url, sim, f"bench-peer-tput-{label}-{n}", n, processes) as peer:
                peer_run = _run_load("peer", n, seconds, sim, None, expected, peer.worker.pids(), sanity, where, peer)
            settings = bench_settings(broker_url, sim.url, security, concurrency=n, chat_s=30.0)
            with _fleet(settings, [CHAT_MODEL], f"bench-tput-{label}-{n}", n, processes) as fleet:
                direct = _run_load("direct", n, seconds, sim, None, expected, fleet.worker.pids(), sanity, where)
                via = _run_load("fleet", n, seconds, sim, settings, expected, fleet.worker.pids(), sanity, where)
                rss_mb = fleet.worker.rss_bytes() / MB
            direct_rate = max(1e-9, direct["requests_per_s"]["value"])
            ideal = n / ((100 + 20 * (OUTPUT_TOKENS - 1)) / 1000.0)
            results["levels"][str(n)] = {
                "direct": direct,
                "peer": peer_run,
                "fleet": via,
                "ratio": {"value": via["requests_per_s"]["value"] / direct_rate, "unit": "fleet/direct"},
                "peer_ratio": {"value": peer_run["requests_per_s"]["value"] / direct_rate, "unit": "peer/direct"},
                "fleet_over_peer": {
                    "value": via["requests_per_s"]["value"] / max(1e-9, peer_run["requests_per_s"]["value"]),
                    "unit": "fleet/peer",
                },
                "ideal_requests_per_s": {"value": ideal, "unit": "req/s"},
                "worker_rss_mb": {"value": rss_mb, "unit": "MB"},
                "worker_processes": {"value": processes, "unit": "processes"},
            }
    finally:
        sim.stop()
    return results


# -- 3. streaming ---------------------------------------------------------------------------------------


def _direct_stream(client: VllmClient, model: str, index: int) -> tuple[float, list[float], str, Any]:
    started = time.perf_counter()
    first: float | None = None
    arrivals: list[float] = []
    parts: list[str] = []
    usage = None
    with client.stream_chat(chat_request(model, index)) as stream:
        for chunk in stream:
            now = time.perf_counter()
            if chunk.content:
                parts.append(chunk.content)
                arrivals.append(now)
                if first is None:
                    first = now
            if chunk.usage is not None:
                usage = chunk.usage.completion_tokens
    ttft = ((first or time.perf_counter()) - started) * 1000.0
    gaps = gaps_ms(arrivals)
    return ttft, gaps, "".join(parts), usage


def _fleet_stream(model: str, index: int, max_tokens: int = MAX_TOKENS) -> tuple[float, list[float], str, Any, Any]:
    from tasks import StreamReset, open_stream, stream_chat

    started = time.perf_counter()
    result = stream_chat.delay(model=model, messages=chat_messages(index), max_tokens=max_tokens)
    first: float | None = None
    arrivals: list[float] = []
    parts: list[str] = []
    usage = None
    for item in open_stream(result):
        now = time.perf_counter()
        if isinstance(item, StreamReset):
            parts.clear()
            continue
        if item.content:
            parts.append(item.content)
            arrivals.append(now)
            if first is None:
                first = now
        if item.usage is not None:
            usage = item.usage.completion_tokens
    ttft = ((first or time.perf_counter()) - started) * 1000.0
    gaps = gaps_ms(arrivals)
    final = result.get(timeout=RESULT_TIMEOUT_S)
    return ttft, gaps, "".join(parts), usage, final


def _peer_stream(peer: Peer, store: Any, model: str, index: int) -> tuple[float, list[float], str, Any, Any]:
    """One stream through the peer's streaming task, read from its Redis stream as chunks arrive."""
    started = time.perf_counter()
    key = new_stream_key()
    body = {"model": model, "messages": chat_messages(index), "max_tokens": MAX_TOKENS}
    result = peer.app.tasks[STREAM_TASK].delay(body, key)
    first: float | None = None
    arrivals: list[float] = []
    parts: list[str] = []
    usage = finish = None
    for chunk in read_stream(store, key):
        now = time.perf_counter()
        for choice in chunk.get("choices") or []:
            content = (choice.get("delta") or {}).get("content")
            if content:
                parts.append(content)
                arrivals.append(now)
                if first is None:
                    first = now
            finish = choice.get("finish_reason") or finish
        if chunk.get("usage"):
            usage = chunk["usage"].get("completion_tokens")
    ttft = ((first or time.perf_counter()) - started) * 1000.0
    result.get(timeout=RESULT_TIMEOUT_S)
    store.delete(key)
    return ttft, gaps_ms(arrivals), "".join(parts), usage, finish


def measure_streaming(broker_url: str, streams: int, sanity: Sanity) -> dict[str, Any]:
    """TTFT and chunk gaps at the producer's stream iterator, at the plain Celery peer's stream reader and at a
    direct streaming client, interleaved (the fleet and the peer in alternating order)."""
    import redis as redis_lib

    sim = start_simulator("sim-stream", [CHAT_MODEL], ttft_ms=100, itl_ms=20, output_tokens=OUTPUT_TOKENS)
    store = redis_lib.Redis.from_url(f"{REDIS_BASE}/{STATE_DB}")
    ttft: dict[str, list[float]] = {"direct": [], "fleet": [], "peer": []}
    gaps: dict[str, list[float]] = {"direct": [], "fleet": [], "peer": []}
    try:
        expected = expected_answers(sim.url, CHAT_MODEL)
        settings = bench_settings(broker_url, sim.url, bench_security(), concurrency=8)
        with (
            _fleet(settings, [CHAT_MODEL], "bench-stream", 8),
            _peer(broker_url, sim, "bench-peer-stream", 8) as peer,
            direct_client(sim.url) as client,
        ):
            _fleet_stream(CHAT_MODEL, 0)
            _peer_stream(peer, store, CHAT_MODEL, 0)
            for i in range(streams):
                index = i % PROMPTS
                want = expected[str(index)]
                streams_of: dict[str, Callable[[], Any]] = {
                    "direct": partial(_direct_stream, client, CHAT_MODEL, index),
                    "fleet": partial(_fleet_stream, CHAT_MODEL, index),
                    "peer": partial(_peer_stream, peer, store, CHAT_MODEL, index),
                }
                got: dict[str, Any] = {}
                for kind in ("direct", "peer", "fleet") if i % 2 else ("direct", "fleet", "peer"):
                    try:
                        got[kind] = streams_of[kind]()
                    except Exception as exc:
                        sanity.of(kind).fail("streaming", f"{kind}: {type(exc).__name__}: {exc}")
                        break
                if len(got) < len(streams_of):
                    continue
                d_ttft, d_gaps, d_text, d_usage = got["direct"]
                f_ttft, f_gaps, f_text, f_usage, final = got["fleet"]
                p_ttft, p_gaps, p_text, p_usage, p_finish = got["peer"]
                ok = sanity.check("streaming direct", d_text, d_usage, "stop", want)
                ok = sanity.check("streaming fleet chunks", f_text, f_usage, "stop", want) and ok
                ok = sanity.check("streaming fleet result", *_reply_fields(final), want) and ok
                ok = sanity.of("peer").check("streaming peer chunks", p_text, p_usage, p_finish, want) and ok
                if not ok:
                    continue
                for kind, first, between in (
                    ("direct", d_ttft, d_gaps),
                    ("fleet", f_ttft, f_gaps),
                    ("peer", p_ttft, p_gaps),
                ):
                    ttft[kind].append(first)
                    gaps[kind].extend(between)
    finally:
        store.close()
        sim.stop()
    if not ttft["direct"]:
        return {"streams": 0}
    return {
        "streams": len(ttft["direct"]),
        "simulator": {"ttft_ms": 100, "itl_ms": 20, "output_tokens": OUTPUT_TOKENS},
        "method": (
            "paired: one direct stream, then one fleet and one peer stream (alternating order), repeated; TTFT to "
            "the first content chunk at the reader. Peer: a plain Celery task that XADDs each SSE data line to a "
            "Redis stream the caller reads with XREAD BLOCK"
        ),
        "direct_ttft_ms": summarize(ttft["direct"]),
        "fleet_ttft_ms": summarize(ttft["fleet"]),
        "peer_ttft_ms": summarize(ttft["peer"]),
        "added_ttft_ms": summarize(paired_differences(ttft["direct"], ttft["fleet"])),
        "peer_added_ttft_ms": summarize(paired_differences(ttft["direct"], ttft["peer"])),
        "direct_chunk_gap_ms": summarize(gaps["direct"]),
        "fleet_chunk_gap_ms": summarize(gaps["fleet"]),
        "peer_chunk_gap_ms": summarize(gaps["peer"]),
    }


def measure_relay(broker_url: str, tokens: int, sanity: Sanity) -> dict[str, Any]:
    """Chunks per second one worker relays: a long stream with zero inter-token latency, vs reading it directly."""
    sim = start_simulator("sim-relay", [CHAT_MODEL], context=tokens + 4096, output_tokens=tokens)
    try:
        settings = bench_settings(broker_url, sim.url, bench_security(), concurrency=8, stream_s=300)
        with _fleet(settings, [CHAT_MODEL], "bench-relay", 8) as fleet, direct_client(sim.url) as client:
            started = time.perf_counter()
            _, d_gaps, d_text, d_usage = _direct_stream_long(client, tokens)
            direct_s = time.perf_counter() - started
            meter = _meter(sim, {"worker": fleet.worker.pids()}, [])
            meter.start()
            started = time.perf_counter()
            _, f_gaps, f_text, f_usage, final = _fleet_stream(CHAT_MODEL, 1, max_tokens=tokens + 16)
            fleet_s = time.perf_counter() - started
            cpu = meter.stop()
    finally:
        sim.stop()
    if d_usage != tokens or f_usage != tokens or f_text != d_text:
        sanity.fail("relay", f"stream of {tokens} tokens: direct {d_usage}, fleet {f_usage}", wrong=True)
    else:
        sanity.ok(2)
    if final.get("content") != d_text:
        sanity.fail("relay", "assembled result differs from the streamed text", wrong=True)
    chunks = len(f_gaps) + 1
    d_chunks = len(d_gaps) + 1
    return {
        "tokens": tokens,
        "direct_chunks_per_s": {"value": rate(d_chunks, sum(d_gaps) / 1000.0), "unit": "chunks/s"},
        "fleet_chunks_per_s": {"value": rate(chunks, sum(f_gaps) / 1000.0), "unit": "chunks/s"},
        "direct_total_s": {"value": direct_s, "unit": "s"},
        "fleet_total_s": {"value": fleet_s, "unit": "s"},
        "cpu_cores": _cores_figure(cpu),
        "method": "chunks between the first and last content chunk over that time, at the reader",
    }


def _direct_stream_long(client: VllmClient, tokens: int) -> tuple[float, list[float], str, Any]:
    from provider.vllm.models import ChatRequest

    request = ChatRequest(model=CHAT_MODEL, messages=chat_messages(1), max_tokens=tokens + 16)
    started = time.perf_counter()
    arrivals: list[float] = []
    parts: list[str] = []
    usage = None
    with client.stream_chat(request, timeout_s=300) as stream:
        for chunk in stream:
            if chunk.content:
                arrivals.append(time.perf_counter())
                parts.append(chunk.content)
            if chunk.usage is not None:
                usage = chunk.usage.completion_tokens
    ttft = (arrivals[0] - started) * 1000.0 if arrivals else 0.0
    gaps = gaps_ms(arrivals)
    return ttft, gaps, "".join(parts), usage


# -- 4. envelope cost -----------------------------------------------------------------------------------


def measure_codec(seconds: float, rounds: int) -> dict[str, Any]:
    """``bench.codec.bench_codec``: sign+seal and verify+open rates beside bare Ed25519 verify."""
    from bench.codec import bench_codec

    raw = bench_codec(seconds=seconds, rounds=rounds)
    figures: dict[str, Any] = {
        name: {"value": value, "unit": "ratio" if name.endswith("ratio") else "ops/s"} for name, value in raw.items()
    }
    return figures


# -- 6. growth: lanes and backlog -----------------------------------------------------------------------


def measure_lanes(broker_url: str, lane_counts: list[int], requests: int, sanity: Sanity) -> dict[str, Any]:
    """Overhead and worker RSS when the worker consumes 1, 10, 100 lanes (a simulator serving that many models)."""
    results: dict[str, Any] = {}
    security = bench_security()
    for count in lane_counts:
        models = [f"lane-model-{i:03d}" for i in range(count)]
        sim = start_simulator(f"sim-lanes-{count}", models, context=8192)
        try:
            settings = bench_settings(broker_url, sim.url, security, concurrency=8)
            started = time.perf_counter()
            with _fleet(settings, models, f"bench-lanes-{count}", 8) as fleet:
                ready_s = time.perf_counter() - started
                rss_idle = fleet.worker.rss_bytes()
                samples = _paired_run(sim.url, models, requests, sanity, f"lanes[{count}]")
                meter = _meter(sim, {"worker": fleet.worker.pids()}, [])
                meter.start()
                time.sleep(1.0)
                idle_cpu = meter.stop()
                figures = _overhead_figures(samples)
                figures["worker_rss_mb"] = {"value": fleet.worker.rss_bytes() / MB, "unit": "MB"}
                figures["worker_rss_idle_mb"] = {"value": rss_idle / MB, "unit": "MB"}
                figures["worker_ready_s"] = {"value": ready_s, "unit": "s"}
                figures["worker_idle_cores"] = {"value": idle_cpu.get("worker", 0.0), "unit": "cores"}
                figures["redis_idle_cores"] = {"value": idle_cpu.get("redis", 0.0), "unit": "cores"}
                results[str(count)] = figures
        finally:
            sim.stop()
    return results


def measure_backlog(redis_broker_url: str, tasks_count: int, concurrency: int, sanity: Sanity) -> dict[str, Any]:
    """Publish ``tasks_count`` chats to a lane no worker consumes yet, then start a worker: drain rate and memory."""
    import redis as redis_lib

    from tasks.runtime import runtime

    sim = start_simulator("sim-backlog", [CHAT_MODEL], context=BACKLOG_CONTEXT)
    security = bench_security()
    try:
        expected = expected_answers(sim.url, CHAT_MODEL)
        settings = bench_settings(
            redis_broker_url,
            sim.url,
            security,
            concurrency=concurrency,
            max_length=max(20000, tasks_count * 2),
            chat_s=900.0,
        )
        configure_producer(settings)
        publish = _publish_backlog(settings, tasks_count)
        depth = runtime().lane_depth(publish["lane"])
        results_db = redis_lib.Redis.from_url(f"{REDIS_BASE}/{BACKEND_DB}")
        base_results = int(results_db.dbsize())
        worker = start_worker(worker_env(settings), "bench-backlog-drain", concurrency)
        try:
            drain = _watch_drain(worker, results_db, base_results, tasks_count)
            meter = _meter(sim, {"worker": worker.pids()}, [])
            meter.start()
            time.sleep(1.0)
            idle = meter.stop()
            rss_idle_after = worker.rss_bytes()
        finally:
            worker.stop()
        checked = _check_backlog_results(publish["task_ids"], expected, sanity)
    finally:
        sim.stop()
    return {
        "tasks": tasks_count,
        "lane": publish["lane"],
        "lane_depth_before_drain": depth,
        "worker_concurrency": concurrency,
        "publish_per_s": {"value": publish["per_s"], "unit": "tasks/s"},
        "publish_threads": publish["threads"],
        "drain_per_s": {"value": drain["per_s"], "unit": "tasks/s"},
        "drain_s": {"value": drain["seconds"], "unit": "s"},
        "worker_start_to_first_result_s": {"value": drain["first_s"], "unit": "s"},
        "worker_rss_at_first_result_mb": {"value": drain["start_rss"] / MB, "unit": "MB"},
        "worker_rss_peak_mb": {"value": drain["peak_rss"] / MB, "unit": "MB"},
        "worker_rss_after_mb": {"value": rss_idle_after / MB, "unit": "MB"},
        "worker_cores_during_drain": {"value": drain["worker_cores"], "unit": "cores"},
        "worker_idle_cores_after": {"value": idle.get("worker", 0.0), "unit": "cores"},
        "results_checked": checked,
        "method": (
            "envelopes published while no worker runs (lane depth checked), then one worker started; drain = "
            "from the first stored result to the last (results counted in the backend database); RSS sampled "
            "every 50 ms"
        ),
    }


def _publish_backlog(settings: Settings, count: int, threads: int = 4) -> dict[str, Any]:
    """Publish from a child process (its result subscriptions end with it); returns ids and the rate."""
    proc = Managed(
        "backlog-publisher",
        [sys.executable, "-m", "bench.backlog"],
        env=worker_env(settings),
        stdout=subprocess.PIPE,
        stdin=subprocess.PIPE,
    )
    try:
        assert proc.process.stdin is not None
        config = {"count": count, "threads": threads, "model": CHAT_MODEL, "context": BACKLOG_CONTEXT}
        proc.process.stdin.write(json.dumps(config) + "\n")
        proc.process.stdin.flush()
        report: dict[str, Any] = json.loads(_readline(proc, 600))
    finally:
        proc.stop()
    if report.get("errors"):
        raise RuntimeError(f"publishing the backlog failed: {report['errors'][:3]}")
    return report


def _watch_drain(worker: Managed, results_db: Any, base: int, count: int, timeout_s: float = 900) -> dict[str, Any]:
    """Poll the stored-result count and the worker's RSS until every task has a result."""
    started = time.monotonic()
    first: float | None = None
    peak = start_rss = 0
    done_at: float | None = None
    cpu_start = cpu_end = 0.0
    while time.monotonic() - started < timeout_s:
        if not worker.alive():
            raise RuntimeError(f"the draining worker exited: {worker.log_tail()}")
        stored = int(results_db.dbsize()) - base
        now = time.monotonic()
        rss = worker.rss_bytes()
        peak = max(peak, rss)
        if stored > 0 and first is None:
            first = now
            start_rss = rss
            cpu_start = worker.cpu_seconds()
        if stored >= count:
            done_at = now
            cpu_end = worker.cpu_seconds()
            break
        time.sleep(0.05)
    if done_at is None or first is None:
        raise RuntimeError(f"the backlog did not drain within {timeout_s} s")
    seconds = done_at - first
    return {
        "per_s": rate(count, seconds),
        "seconds": seconds,
        "first_s": first - started,
        "start_rss": start_rss,
        "peak_rss": peak,
        "worker_cores": (cpu_end - cpu_start) / seconds if seconds > 0 else 0.0,
    }


def _check_backlog_results(task_ids: list[str], expected: dict[str, str], sanity: Sanity) -> int:
    """Open every stored response envelope (signature, decryption) and check its answer."""
    from tasks.app import app
    from tasks.runtime import runtime

    backend = app.backend
    codec = runtime().codec
    client = backend.client
    checked = 0
    for offset in range(0, len(task_ids), 500):
        batch = task_ids[offset : offset + 500]
        raw = client.mget([backend.get_key_for_task(task_id) for task_id in batch])
        for position, (task_id, value) in enumerate(zip(batch, raw, strict=True)):
            index = (offset + position) % PROMPTS
            if value is None:
                sanity.fail("backlog", f"no result for {task_id}")
                continue
            meta = backend.decode_result(value)
            if meta.get("status") != "SUCCESS":
                sanity.fail("backlog", f"{task_id}: {meta.get('status')} {str(meta.get('result'))[:120]}")
                continue
            try:
                reply = codec.open_response(meta["result"], request_id=task_id)
            except Exception as exc:
                sanity.fail("backlog", f"{task_id}: {type(exc).__name__}: {exc}")
                continue
            if sanity.check("backlog", *_reply_fields(reply), expected[str(index)]):
                checked += 1
    return checked
