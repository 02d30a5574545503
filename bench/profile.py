"""Where the fleet's time goes: py-spy samples of the worker and the producer during sequential requests.

Skipped (returns ``None``) when py-spy is not installed. The top frames by inclusive share of on-CPU samples
are kept, leaving out the frames every stack has (thread bootstrap, the Celery command line, the event loop).
"""

from __future__ import annotations

import collections
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.fleet import (
    BACKEND_DB,
    BROKER_DB,
    MAX_TOKENS,
    REDIS_BASE,
    STATE_DB,
    bench_security,
    bench_settings,
    chat_messages,
    start_fleet,
)
from bench.procs import cpu_seconds, start_peer_worker, start_simulator

__all__ = ["AREAS", "areas", "collapse", "count_commands", "profile_worker", "py_spy"]

SAMPLE_RATE_HZ = 500
REDIS_PORT = 6379
TOP_FRAMES = 18
_LINE = re.compile(r":\d+\)$")
_MONITOR_LINE = re.compile(r'^[\d.]+ \[(\d+) [\d.]+:(\d+)\] "(\w+)"')
MONITOR_REQUESTS = 20
_BORING = (
    "threading.py",
    "<frozen runpy>",
    "click/",
    "celery/bin/",
    "celery/__main__.py",
    "celery/bootsteps.py",
    "celery/worker/worker.py",
    "celery/worker/consumer/consumer.py",
    "celery/worker/loops.py",
    "concurrent/futures/thread.py",
    "celery/concurrency/base.py",
    "kombu/asynchronous/hub.py",
    "vine/promises.py",
    "celery/app/trace.py",
    "<module>",
    "bench/",
)


def py_spy() -> str | None:
    """The py-spy executable (the venv's first), or None."""
    beside = Path(sys.executable).with_name("py-spy")
    if beside.exists():
        return str(beside)
    return shutil.which("py-spy")


def collapse(raw: str, top: int = TOP_FRAMES) -> dict[str, Any]:
    """Inclusive and self shares of frames in py-spy's raw (collapsed) output, the common ones left out."""
    inclusive: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, count_text = line.rstrip().rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = [_LINE.sub(")", frame) for frame in stack.split(";")]
        for frame in set(frames):
            inclusive[frame] += count
        own[frames[-1]] += count
    if total == 0:
        return {"samples": 0, "top": [], "self": []}

    def keep(frame: str) -> bool:
        return not any(marker in frame for marker in _BORING)

    top_inclusive = [
        {"frame": frame, "percent": 100.0 * count / total} for frame, count in inclusive.most_common() if keep(frame)
    ][:top]
    top_self = [{"frame": frame, "percent": 100.0 * count / total} for frame, count in own.most_common(10)]
    return {"samples": total, "unit": "percent of on-CPU samples", "top": top_inclusive, "self": top_self}


def count_commands(monitor_output: str, ports: dict[int, str], databases: set[str], requests: int) -> dict[str, Any]:
    """Redis commands per request by process and command, from ``redis-cli monitor`` output.

    ``ports`` maps a client's local port to the process it belongs to; Lua-internal commands are not counted.
    """
    counts: collections.Counter[tuple[str, str]] = collections.Counter()
    for line in monitor_output.splitlines():
        match = _MONITOR_LINE.match(line)
        if match is None:
            continue
        database, port, command = match.groups()
        if database not in databases:
            continue
        who = ports.get(int(port), "other")
        counts[(who, f"db{database} {command.upper()}")] += 1
    per_request: dict[str, dict[str, float]] = {}
    for (who, command), count in sorted(counts.items()):
        per_request.setdefault(who, {})[command] = round(count / max(1, requests), 2)
    return {
        "unit": "commands per request",
        "requests": requests,
        "by_process": per_request,
        "total_per_request": {who: round(sum(commands.values()), 2) for who, commands in per_request.items()},
    }


def _redis_ports(pid: int) -> set[int]:
    import psutil

    try:
        return {
            conn.laddr.port
            for conn in psutil.Process(pid).net_connections(kind="tcp")
            if conn.raddr and conn.raddr.port == REDIS_PORT
        }
    except psutil.Error:
        return set()


def monitor_requests(
    worker_pids: list[int], call: Callable[[int], Any], requests: int = MONITOR_REQUESTS
) -> dict[str, Any] | None:
    """Every Redis command of ``requests`` sequential ``call``s, counted per process (``redis-cli monitor``)."""
    redis_cli = shutil.which("redis-cli")
    if redis_cli is None:
        return None
    out_path = Path(tempfile.mkstemp(prefix="vllm-fleet-bench-monitor-")[1])
    with out_path.open("w") as out:
        monitor = subprocess.Popen([redis_cli, "-p", str(REDIS_PORT), "monitor"], stdout=out, stderr=subprocess.DEVNULL)
        try:
            time.sleep(0.5)
            for i in range(requests):
                call(i)
            time.sleep(0.5)
            ports = {port: "worker" for pid in worker_pids for port in _redis_ports(pid)}
            ports.update(dict.fromkeys(_redis_ports(_own_pid()), "producer"))
        finally:
            monitor.terminate()
            monitor.wait(10)
    text = out_path.read_text(errors="replace")
    out_path.unlink(missing_ok=True)
    counted = count_commands(text, ports, {str(db) for db in (BROKER_DB, BACKEND_DB, STATE_DB)}, requests)
    counted["databases"] = {"broker": BROKER_DB, "results": BACKEND_DB, "state": STATE_DB}
    return counted


# Where a sample's innermost frame lives, first match wins: the areas the worker's CPU goes to.
AREAS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("Redis client (redis-py)", ("redis/",)),
    ("HTTP to vLLM (httpx, httpcore, h11)", ("httpx/", "httpcore/", "h11/")),
    ("signing, sealing (PyJWT, cryptography)", ("jwt/", "cryptography/", "provider/protocol/")),
    ("JSON and validation (json, pydantic)", ("json/", "pydantic", "orjson", "msgspec")),
    ("Celery and kombu (incl. AMQP client)", ("celery/", "kombu/", "amqp/", "vine/", "billiard/")),
    ("the fleet's own code (tasks/, provider/)", ("tasks/", "provider/")),
    ("threads, locks, queues", ("threading.py", "concurrent/", "queue.py")),
    ("sockets and selectors", ("socket.py", "selectors.py", "ssl.py")),
)


def areas(raw: str) -> dict[str, Any]:
    """Share of on-CPU samples by the package of the innermost frame (``AREAS``; the rest under ``other``)."""
    counts: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, count_text = line.rstrip().rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        innermost = stack.split(";")[-1]
        area = next((name for name, markers in AREAS if any(m in innermost for m in markers)), "other")
        counts[area] += count
    return {
        "unit": "percent of on-CPU samples",
        "samples": total,
        "shares": {area: round(100.0 * n / total, 1) for area, n in counts.most_common()} if total else {},
    }


def _record(spy: str, who: str, pid: int, seconds: float, out_dir: Path) -> subprocess.Popen[bytes]:
    argv = [spy, "record", "-p", str(pid), "-d", str(int(seconds)), "-r", str(SAMPLE_RATE_HZ), "-f", "raw"]
    argv += ["--nonblocking", "-o", str(out_dir / f"{who}.raw")]
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _profile_one(
    spy: str, name: str, worker: Any, call: Callable[[int], Any], seconds: float, sanity: Any, out_dir: Path
) -> dict[str, Any]:
    """Warm up, then sample ``worker``'s processes and this caller while ``call`` runs back to back; then count
    the Redis commands of a few more calls."""
    for i in range(30):
        call(i)
    pids = worker.pids()
    spies = [_record(spy, f"{name}-worker-{pid}", pid, seconds, out_dir) for pid in pids]
    spies.append(_record(spy, f"{name}-producer", _own_pid(), seconds, out_dir))
    time.sleep(0.5)
    cpu_before = cpu_seconds(pids)
    started = time.monotonic()
    count = 0
    while time.monotonic() - started < seconds - 1.0:
        try:
            call(count)
        except Exception as exc:
            sanity.fail(f"profile {name}", f"{type(exc).__name__}: {exc}")
        else:
            sanity.ok()
        count += 1
    elapsed = time.monotonic() - started
    cpu_after = cpu_seconds(pids)
    for proc in spies:
        try:
            proc.wait(seconds + 30)
        except subprocess.TimeoutExpired:
            proc.kill()
    worker_raw = "".join(
        path.read_text() + "\n" for path in sorted(out_dir.glob(f"{name}-worker-*.raw")) if path.exists()
    )
    producer_path = out_dir / f"{name}-producer.raw"
    producer_raw = producer_path.read_text() if producer_path.exists() else ""
    result: dict[str, Any] = {
        "requests": count,
        "seconds": round(elapsed, 2),
        "worker_cpu_per_request_ms": {"value": (cpu_after - cpu_before) / max(1, count) * 1000.0, "unit": "ms"},
        "worker": collapse(worker_raw),
        "producer": collapse(producer_raw),
        "worker_areas": areas(worker_raw),
        "producer_areas": areas(producer_raw),
    }
    commands = monitor_requests(pids, call)
    if commands is not None:
        result["redis_commands"] = commands
    return result


def profile_worker(broker_url: str, seconds: float, sanity: Any) -> dict[str, Any] | None:
    """Sample the fleet's worker and then the plain Celery peer's (and this caller) while each serves sequential
    chats from a zero-latency simulator; the fleet's figures stay at the top level, the peer's under ``peer``."""
    spy = py_spy()
    if spy is None:
        return None
    from bench.peer import CHAT_TASK, build_app, peer_worker_env
    from tasks import chat

    sim = start_simulator("sim-profile", ["bench-chat"])
    out_dir = Path(tempfile.mkdtemp(prefix="vllm-fleet-bench-profile-"))
    backend, streams = f"{REDIS_BASE}/{BACKEND_DB}", f"{REDIS_BASE}/{STATE_DB}"
    try:
        settings = bench_settings(broker_url, sim.url, bench_security(), concurrency=8)
        fleet = start_fleet(settings, ["bench-chat"], name="bench-profile", concurrency=8)
        try:

            def fleet_call(i: int) -> Any:
                reply = chat.delay(model="bench-chat", messages=chat_messages(i % 8), max_tokens=MAX_TOKENS).get()
                if not reply.get("content"):
                    raise ValueError("empty answer")
                return reply

            result = _profile_one(spy, "fleet", fleet.worker, fleet_call, seconds, sanity.of("fleet"), out_dir)
        finally:
            fleet.stop()
        peer_worker = start_peer_worker(peer_worker_env(broker_url, backend, sim.url, streams, 8), "bench-peer-prof", 8)
        peer_app = build_app(broker_url, backend)
        try:
            peer_chat = peer_app.tasks[CHAT_TASK]

            def peer_call(i: int) -> Any:
                body = {"model": "bench-chat", "messages": chat_messages(i % 8), "max_tokens": MAX_TOKENS}
                reply = peer_chat.delay(body).get(timeout=60)
                if not reply["choices"][0]["message"]["content"]:
                    raise ValueError("empty answer")
                return reply

            peer_call(0)  # waits for the worker to come up
            result["peer"] = _profile_one(spy, "peer", peer_worker, peer_call, seconds, sanity.of("peer"), out_dir)
        finally:
            peer_worker.stop()
            peer_app.close()
    finally:
        sim.stop()
        shutil.rmtree(out_dir, ignore_errors=True)
    result["what"] = (
        f"py-spy, {SAMPLE_RATE_HZ} Hz on-CPU samples, sequential chats for {seconds:g} s each, zero-latency "
        "simulator, the run's Redis broker"
    )
    result["top"] = result["worker"]["top"]
    return result


def _own_pid() -> int:
    import os

    return os.getpid()
