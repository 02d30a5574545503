"""The processes a benchmark run starts, and their cleanup even on failure.

Every child (simulator, Celery worker, load generator) runs in its own session, so stopping it signals
its whole process group. Every child is recorded in ``ALL``; ``stop_all`` (called from ``finally`` and at
exit, and on SIGTERM/SIGINT through ``install_signal_handlers``) ends whatever is still running.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO, Any

import psutil

from provider.sizing import process_shares, worker_threads
from simulator.cli import READY_PREFIX

__all__ = [
    "ALL",
    "CpuMeter",
    "Managed",
    "PeerWorker",
    "flush_redis",
    "install_signal_handlers",
    "rabbit_vhost",
    "server_pids",
    "start_peer_worker",
    "start_simulator",
    "start_worker",
    "stop_all",
]

ROOT = Path(__file__).resolve().parents[1]
LOG_DIR = Path(tempfile.gettempdir()) / "vllm-fleet-bench"
STOP_GRACE_S = 10.0
SIM_START_TIMEOUT_S = 30.0
ALL: list[Managed] = []
_lock = threading.Lock()


def _child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    python_path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": python_path, "PYTHONUNBUFFERED": "1", **(extra or {})}


def cpu_seconds(pids: Sequence[int]) -> float:
    """CPU time (user + system) of the processes ``pids`` (those gone count nothing)."""
    total = 0.0
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            times = psutil.Process(pid).cpu_times()
            total += times.user + times.system
    return total


class Managed:
    """One child process in its own process group, stopped with its group."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        stdout: int | IO[Any] | None = None,
        stdin: int | None = None,
    ) -> None:
        LOG_DIR.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.log_path = LOG_DIR / f"{name}.{os.getpid()}.log"
        self._log = self.log_path.open("w")
        self.process = subprocess.Popen(
            list(argv),
            env=_child_env(env),
            stdout=stdout if stdout is not None else self._log,
            stderr=self._log,
            stdin=stdin,
            text=True,
            start_new_session=True,
            cwd=ROOT,
        )
        self.ps = psutil.Process(self.process.pid)
        with _lock:
            ALL.append(self)

    @property
    def pid(self) -> int:
        """The child's process id (also its process group id)."""
        return self.process.pid

    def alive(self) -> bool:
        """Whether the child still runs."""
        return self.process.poll() is None

    def pids(self) -> list[int]:
        """The child's process id and its descendants' (a worker group's processes)."""
        with contextlib.suppress(psutil.Error):
            return [self.pid, *(child.pid for child in self.ps.children(recursive=True))]
        return [self.pid]

    def cpu_seconds(self) -> float:
        """CPU time (user + system) of the child and its descendants."""
        return cpu_seconds(self.pids())

    def rss_bytes(self) -> int:
        """Resident memory of the child and its descendants."""
        total = 0
        with contextlib.suppress(psutil.Error):
            for proc in [self.ps, *self.ps.children(recursive=True)]:
                with contextlib.suppress(psutil.Error):
                    total += proc.memory_info().rss
        return total

    def log_tail(self, lines: int = 30) -> str:
        """The last lines the child wrote to its log."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, grace_s: float = STOP_GRACE_S) -> None:
        """SIGTERM to the group, then SIGKILL to the group if it lingers."""
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.process.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(grace_s)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(grace_s)
        self._log.close()
        with _lock:
            if self in ALL:
                ALL.remove(self)


def stop_all() -> None:
    """Stop every child still running (newest first)."""
    with _lock:
        children = list(reversed(ALL))
    for child in children:
        with contextlib.suppress(Exception):
            child.stop(grace_s=3.0)


def install_signal_handlers() -> None:
    """Turn SIGTERM into SystemExit so ``finally`` blocks run; stop children at interpreter exit too."""

    def _exit(signum: int, _frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, _exit)
    atexit.register(stop_all)


def _read_lines(stream: IO[str], lines: queue.Queue[str]) -> None:
    for line in stream:
        lines.put(line)


@dataclass
class Simulator:
    """A ``vllm-sim`` child and its URL."""

    managed: Managed
    url: str
    models: list[str] = field(default_factory=list)

    def stop(self) -> None:
        """Stop the child."""
        self.managed.stop()


def start_simulator(
    name: str,
    models: Sequence[str],
    *,
    context: int = 32768,
    ttft_ms: float = 0.0,
    itl_ms: float = 0.0,
    output_tokens: int = 16,
    max_running: int = 1024,
) -> Simulator:
    """Start ``vllm-sim`` on a free loopback port serving ``models`` (lorem text) and wait for its URL."""
    argv = [sys.executable, "-m", "simulator.cli", "--host", "127.0.0.1", "--port", "0"]
    for model in models:
        argv += ["--model", f"{model}:{context}"]
    argv += [
        "--ttft-ms",
        str(ttft_ms),
        "--itl-ms",
        str(itl_ms),
        "--output-tokens",
        str(output_tokens),
        "--max-running",
        str(max_running),
        "--text-mode",
        "lorem",
    ]
    managed = Managed(name, argv, stdout=subprocess.PIPE)
    assert managed.process.stdout is not None
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=_read_lines, args=(managed.process.stdout, lines), daemon=True).start()
    deadline = time.monotonic() + SIM_START_TIMEOUT_S
    while True:
        try:
            line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            managed.stop()
            raise RuntimeError(f"simulator {name} did not start: {managed.log_tail()}") from None
        if line.startswith(READY_PREFIX):
            return Simulator(managed, line[len(READY_PREFIX) :].strip(), list(models))


def start_worker(env: Mapping[str, str], name: str, concurrency: int, processes: int = 1) -> Managed:
    """A real ``celery worker`` (threads pool) configured only by ``VLLM_FLEET_*`` variables.

    With ``processes`` > 1: ``vllm-fleet worker --processes K``, whose processes share the instance's slots.
    """
    from tasks.cli import worker_group_argv, worker_process_argv

    # One process: the threads ``vllm-fleet worker`` gives it (``sizing.worker_threads``); K: it sizes them itself.
    threads = worker_threads([concurrency])
    argv = worker_process_argv(name, threads) if processes == 1 else worker_group_argv(name, processes)
    return Managed(name, argv, env=env, stdout=subprocess.DEVNULL)


@dataclass
class PeerWorker:
    """The plain Celery peer's worker: ``processes`` ``celery -A bench.peer worker -P threads`` processes."""

    processes: list[Managed]

    @property
    def names(self) -> list[str]:
        """The Celery node names (``name@host``) of its processes, without the host."""
        return [proc.name for proc in self.processes]

    def pids(self) -> list[int]:
        """Every process id of the peer's worker processes."""
        return [pid for proc in self.processes for pid in proc.pids()]

    def alive(self) -> bool:
        """Whether every process still runs."""
        return all(proc.alive() for proc in self.processes)

    def rss_bytes(self) -> int:
        """Resident memory of all its processes."""
        return sum(proc.rss_bytes() for proc in self.processes)

    def log_tail(self, lines: int = 30) -> str:
        """The last lines each process wrote."""
        return "\n".join(f"[{proc.name}] {proc.log_tail(lines)}" for proc in self.processes)

    def stop(self) -> None:
        """Warm shutdown of every process (killed if it lingers)."""
        for proc in self.processes:
            proc.stop()


def start_peer_worker(env: Mapping[str, str], name: str, concurrency: int, processes: int = 1) -> PeerWorker:
    """The peer's worker, sized like the fleet's: ``processes`` processes whose threads add up to ``concurrency``."""
    started: list[Managed] = []
    try:
        for index, share in enumerate(process_shares(concurrency, processes), start=1):
            node = name if processes == 1 else f"{name}-{index}"
            argv = [sys.executable, "-m", "celery", "-A", "bench.peer", "worker", "-P", "threads", "-c", str(share)]
            argv += ["-n", f"{node}@%h", "--without-mingle", "--without-gossip", "-l", "WARNING"]
            started.append(Managed(node, argv, env={**env, "VFT_PEER_SLOTS": str(share)}, stdout=subprocess.DEVNULL))
    except BaseException:
        for proc in started:
            proc.stop()
        raise
    return PeerWorker(started)


def flush_redis(base_url: str, databases: Sequence[int]) -> None:
    """Empty the benchmark's own Redis databases (never the default ones)."""
    import redis

    for db in databases:
        client = redis.Redis.from_url(f"{base_url}/{db}")
        client.flushdb()
        client.close()


def _rabbitmqctl(*args: str, check: bool = True) -> None:
    result = subprocess.run(["rabbitmqctl", "-q", *args], capture_output=True, text=True, timeout=120)
    if check and result.returncode != 0:
        raise RuntimeError(f"rabbitmqctl {' '.join(args)} failed: {result.stderr.strip()}")


@contextlib.contextmanager
def rabbit_vhost(vhost: str, host: str = "127.0.0.1", port: int = 5672) -> Iterator[str]:
    """A fresh RabbitMQ vhost (guest has every permission on it), deleted afterwards; yields its URL."""
    _rabbitmqctl("delete_vhost", vhost, check=False)
    _rabbitmqctl("add_vhost", vhost)
    try:
        _rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
        yield f"amqp://guest:guest@{host}:{port}/{vhost}"
    finally:
        _rabbitmqctl("delete_vhost", vhost, check=False)


SERVER_PORTS = {"redis": 6379, "rabbitmq": 5672}


def _listens_on(proc: psutil.Process, port: int) -> bool:
    with contextlib.suppress(psutil.Error):
        return any(conn.status == psutil.CONN_LISTEN and conn.laddr.port == port for conn in proc.net_connections())
    return False


def server_pids() -> dict[str, list[int]]:
    """Process ids of the Redis and RabbitMQ servers the benchmark uses (those listening on the default ports:
    private brokers that tests start on other ports are not counted)."""
    found: dict[str, list[int]] = {"redis": [], "rabbitmq": []}
    for proc in psutil.process_iter(["name"]):
        name = proc.info.get("name") or ""
        kind = "redis" if name.startswith("redis-server") else "rabbitmq" if name in ("beam.smp", "beam") else None
        if kind is not None and _listens_on(proc, SERVER_PORTS[kind]):
            found[kind].append(proc.pid)
    return found


def _cpu_by_pid(pids: Sequence[int]) -> dict[int, float]:
    readings: dict[int, float] = {}
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            times = psutil.Process(pid).cpu_times()
            readings[pid] = times.user + times.system
    return readings


def _used(start: dict[int, float], end: dict[int, float]) -> float:
    """CPU seconds between two readings, counting only processes present in both (one that ended or was
    replaced between them would otherwise count negative)."""
    return sum(max(0.0, end[pid] - start[pid]) for pid in start.keys() & end.keys())


class CpuMeter:
    """CPU seconds used by named groups of processes between ``start`` and ``stop``, as cores busy."""

    def __init__(self, groups: Mapping[str, Sequence[int]], details: Mapping[str, Sequence[int]] | None = None) -> None:
        self.groups = {name: list(pids) for name, pids in groups.items()}
        self.details = {name: list(pids) for name, pids in (details or {}).items()}
        self._start: dict[str, dict[int, float]] = {}
        self._details_start: dict[str, dict[int, float]] = {}
        self._machine_start: Any = None
        self._t0 = 0.0
        self.wall_s = 0.0
        self.result: dict[str, float] = {}
        self.detail_result: dict[str, float] = {}

    def start(self) -> None:
        """Take the first reading."""
        self._t0 = time.monotonic()
        self._machine_start = psutil.cpu_times()
        self._start = {name: _cpu_by_pid(pids) for name, pids in self.groups.items()}
        self._details_start = {name: _cpu_by_pid(pids) for name, pids in self.details.items()}

    def stop(self) -> dict[str, float]:
        """Cores busy per group over the interval, plus ``machine`` (all processes), ``other`` and ``idle``
        (``details``, measured apart and not part of these sums, land in ``detail_result``)."""
        wall = self.wall_s = time.monotonic() - self._t0
        machine = psutil.cpu_times()
        result = {
            name: _used(self._start[name], _cpu_by_pid(pids)) / wall if wall > 0 else 0.0
            for name, pids in self.groups.items()
        }
        idle_s = (machine.idle - self._machine_start.idle) + (
            getattr(machine, "iowait", 0.0) - getattr(self._machine_start, "iowait", 0.0)
        )
        cores = psutil.cpu_count() or 1
        known = sum(result.values())
        result["idle"] = idle_s / wall if wall > 0 else 0.0
        result["machine"] = max(0.0, cores - result["idle"])
        result["other"] = max(0.0, result["machine"] - known)
        self.result = result
        self.detail_result = {
            name: _used(self._details_start[name], _cpu_by_pid(pids)) / wall if wall > 0 else 0.0
            for name, pids in self.details.items()
        }
        return result
