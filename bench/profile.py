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
from pathlib import Path
from typing import Any

from bench.fleet import (
    BACKEND_DB,
    BROKER_DB,
    MAX_TOKENS,
    STATE_DB,
    bench_security,
    bench_settings,
    chat_messages,
    start_fleet,
)
from bench.procs import start_simulator

__all__ = ["collapse", "count_commands", "profile_worker", "py_spy"]

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


def monitor_requests(worker_pid: int, requests: int = MONITOR_REQUESTS) -> dict[str, Any] | None:
    """Every Redis command of ``requests`` sequential chats, counted per process (``redis-cli monitor``)."""
    redis_cli = shutil.which("redis-cli")
    if redis_cli is None:
        return None
    from tasks import chat

    out_path = Path(tempfile.mkstemp(prefix="vllm-fleet-bench-monitor-")[1])
    with out_path.open("w") as out:
        monitor = subprocess.Popen([redis_cli, "-p", str(REDIS_PORT), "monitor"], stdout=out, stderr=subprocess.DEVNULL)
        try:
            time.sleep(0.5)
            for i in range(requests):
                chat.delay(model="bench-chat", messages=chat_messages(i % 8), max_tokens=MAX_TOKENS).get()
            time.sleep(0.5)
            ports = dict.fromkeys(_redis_ports(worker_pid), "worker")
            ports.update(dict.fromkeys(_redis_ports(_own_pid()), "producer"))
        finally:
            monitor.terminate()
            monitor.wait(10)
    text = out_path.read_text(errors="replace")
    out_path.unlink(missing_ok=True)
    counted = count_commands(text, ports, {str(db) for db in (BROKER_DB, BACKEND_DB, STATE_DB)}, requests)
    counted["databases"] = {"broker": BROKER_DB, "results": BACKEND_DB, "state": STATE_DB}
    return counted


def profile_worker(broker_url: str, seconds: float, sanity: Any) -> dict[str, Any] | None:
    """Sample the worker (and this producer) while sending sequential chats to a zero-latency simulator."""
    spy = py_spy()
    if spy is None:
        return None
    from tasks import chat

    sim = start_simulator("sim-profile", ["bench-chat"])
    out_dir = Path(tempfile.mkdtemp(prefix="vllm-fleet-bench-profile-"))
    try:
        settings = bench_settings(broker_url, sim.url, bench_security(), concurrency=8)
        fleet = start_fleet(settings, ["bench-chat"], name="bench-profile", concurrency=8)
        try:
            for i in range(30):
                chat.delay(model="bench-chat", messages=chat_messages(i % 8), max_tokens=MAX_TOKENS).get()
            spies = {
                who: subprocess.Popen(
                    [
                        spy,
                        "record",
                        "-p",
                        str(pid),
                        "-d",
                        str(int(seconds)),
                        "-r",
                        str(SAMPLE_RATE_HZ),
                        "-f",
                        "raw",
                        "--nonblocking",
                        "-o",
                        str(out_dir / f"{who}.raw"),
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
                for who, pid in (("worker", fleet.worker.pid), ("producer", _own_pid()))
            }
            time.sleep(0.5)
            cpu_before = fleet.worker.ps.cpu_times()
            started = time.monotonic()
            count = 0
            while time.monotonic() - started < seconds - 1.0:
                reply = chat.delay(model="bench-chat", messages=chat_messages(count % 8), max_tokens=64).get()
                count += 1
                if not reply.get("content"):
                    sanity.fail("profile", "empty answer", wrong=True)
                else:
                    sanity.ok()
            elapsed = time.monotonic() - started
            cpu_after = fleet.worker.ps.cpu_times()
            for proc in spies.values():
                try:
                    proc.wait(seconds + 30)
                except subprocess.TimeoutExpired:
                    proc.kill()
            commands = monitor_requests(fleet.worker.pid)
        finally:
            fleet.stop()
    finally:
        sim.stop()
    worker_cpu_ms = (cpu_after.user + cpu_after.system - cpu_before.user - cpu_before.system) / max(1, count) * 1000.0
    result: dict[str, Any] = {
        "what": f"py-spy, {SAMPLE_RATE_HZ} Hz on-CPU samples, {count} sequential chats in {elapsed:.1f} s, "
        "zero-latency simulator, Redis broker",
        "requests": count,
        "worker_cpu_per_request_ms": {"value": worker_cpu_ms, "unit": "ms"},
    }
    for who in ("worker", "producer"):
        path = out_dir / f"{who}.raw"
        result[who] = collapse(path.read_text()) if path.exists() else {"samples": 0, "top": [], "self": []}
    result["top"] = result["worker"]["top"]
    if commands is not None:
        result["redis_commands"] = commands
    shutil.rmtree(out_dir, ignore_errors=True)
    return result


def _own_pid() -> int:
    import os

    return os.getpid()
