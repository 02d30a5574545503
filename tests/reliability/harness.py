"""Fault-suite parts: private brokers that can be killed and restarted, a simulator that counts what it ran,
worker processes, and a tally of what every submitted request became.

Everything here is a real process or a real server: a private ``redis-server`` (with or without AOF) or a
second RabbitMQ node on free ports, the vLLM simulator under uvicorn, ``celery worker`` processes configured
only through ``VLLM_FLEET_*`` variables. Nothing touches the shared Redis on 6379 or RabbitMQ on 5672 except
the test databases and vhost the session owns.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import redis
import uvicorn
from pydantic import SecretStr

from provider.protocol import FleetError
from provider.settings import InstanceSettings, LaneSettings, SecuritySettings, Settings, Timeouts
from simulator.app import create_app
from simulator.config import ServedModel, SimulatorConfig
from simulator.testing import _Controlled

CHAT_MODEL = "qwen3-6-27b"
EMBED_MODEL = "minilm"
PROFILE = os.environ.get("VFT_RELIABILITY_PROFILE", "short")  # "short" (inside make test) or "full"
SCALE = float(os.environ.get("VFT_RELIABILITY_SCALE", "1"))


def full() -> bool:
    """Whether the full profile runs (``make reliability``)."""
    return PROFILE == "full"


def sized(short: int, full_size: int) -> int:
    """A scenario's size for the current profile (full sizes scale with ``VFT_RELIABILITY_SCALE``)."""
    return max(1, round(full_size * SCALE)) if full() else short


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(predicate: Callable[[], bool], timeout_s: float, what: str, poll_s: float = 0.05) -> float:
    """Poll until ``predicate`` holds; returns the seconds it took; AssertionError at the timeout."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        try:
            if predicate():
                return time.monotonic() - started
        except Exception:  # the thing polled may be down for now
            pass
        time.sleep(poll_s)
    raise AssertionError(f"{what} not reached within {timeout_s} s")


# ------------------------------------------------------------------------------------------------- brokers


class PrivateRedis:
    """A ``redis-server`` of this test's own on a free port: kill it, restart it, with or without AOF."""

    def __init__(self, *, aof: bool) -> None:
        self.port = free_port()
        self.aof = aof
        self.dir = tempfile.mkdtemp(prefix="vft-redis-")
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def start(self) -> None:
        persistence = ["--appendonly", "yes", "--appendfsync", "always"] if self.aof else ["--appendonly", "no"]
        self.process = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--dir",
                self.dir,
                *persistence,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_until(lambda: redis.Redis(port=self.port, socket_timeout=0.5).ping(), 10, "private redis up")

    def kill(self) -> None:
        """SIGKILL: what was not persisted is gone."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)
        self.process = None

    def restart(self, down_s: float = 0.0) -> None:
        self.kill()
        time.sleep(down_s)
        self.start()

    def close(self) -> None:
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


class PrivateRabbit:
    """A second RabbitMQ node (its own name, ports, data and logs) that a test may stop and start."""

    def __init__(self) -> None:
        self.port = free_port()
        self.dist_port = free_port()
        self.name = f"vft{os.getpid()}x{self.port}@localhost"
        self.dir = tempfile.mkdtemp(prefix="vft-rabbit-")
        os.chmod(self.dir, 0o777)  # noqa: S103 - rabbitmq-server started as root runs as the rabbitmq user
        self.env = {
            **os.environ,
            "RABBITMQ_NODENAME": self.name,
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": f"{self.dir}/mnesia",
            "RABBITMQ_LOG_BASE": f"{self.dir}/log",
            "RABBITMQ_PID_FILE": f"{self.dir}/pid",
            "RABBITMQ_ENABLED_PLUGINS_FILE": f"{self.dir}/enabled_plugins",
            "RABBITMQ_CONFIG_FILE": f"{self.dir}/rabbitmq.conf",  # not the host's (it names port 5672)
        }
        with open(f"{self.dir}/enabled_plugins", "w") as plugins:
            plugins.write("[].\n")
        with open(f"{self.dir}/rabbitmq.conf", "w") as config:
            config.write(f"listeners.tcp.local = 127.0.0.1:{self.port}\n")

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}//"

    def _ctl(self, *args: str, timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["rabbitmqctl", "-n", self.name, *args], env=self.env, capture_output=True, text=True, timeout=timeout_s
        )

    def start(self) -> None:
        subprocess.run(["rabbitmq-server", "-detached"], env=self.env, capture_output=True, timeout=60, check=False)
        result = self._ctl("wait", f"{self.dir}/pid", "--timeout", "60", timeout_s=90)
        if result.returncode != 0:
            raise RuntimeError(f"private RabbitMQ node did not start: {result.stderr.strip()[:300]}")

    def stop(self) -> None:
        """Stop the node (its data stays: durable quorum queues and persistent messages survive)."""
        self._ctl("stop", timeout_s=60)

    def close(self) -> None:
        self._ctl("stop", timeout_s=60)
        shutil.rmtree(self.dir, ignore_errors=True)


# ---------------------------------------------------------------------------------------------- simulator


# Monotonic time each harness worker was SIGKILLed at, by identity (see ``Worker``): a run of a killed worker that
# had not ended by then delivered nothing.
KILLED: dict[str, float] = {}
_KILLED_LOCK = threading.Lock()


@dataclass
class Run:
    """One call the simulator received for a request: which worker process sent it (its identity), when it
    started, and when and how it ended (the full response sent, with its status; or the client gone)."""

    identity: str
    started: float
    ended: float | None = None
    status: int = 0
    complete: bool = False
    disconnected: bool = False

    def live_until(self) -> float:
        """When this run stopped mattering: its end, or its worker's death, whichever came first."""
        with _KILLED_LOCK:
            killed = KILLED.get(self.identity, float("inf"))
        return min(self.ended if self.ended is not None else float("inf"), killed)

    def delivered(self) -> bool:
        """A full 200 response sent while its worker was alive: a visible effect."""
        return self.complete and self.status == 200 and self.ended is not None and self.ended <= self.live_until()


class CountingSimulator(_Controlled):
    """The vLLM simulator in a thread, recording every run of every request (keyed by its prompt) with the
    identity of the worker process that sent it.

    **Duplicate rule.** Each ``Worker`` the harness starts has its own identity, the bearer token (``api_key``)
    of every instance in its settings; the simulator reads it from ``Authorization``. A request counts as
    *duplicated* (a duplicated effect) when either

    - it was *delivered* more than once: a full response with status 200 sent, each time while the worker that
      asked was alive (``KILLED`` holds when each identity was SIGKILLed); or
    - it was run by two different live workers at once: two runs of different identities overlapping in time,
      each counted from its start until the earliest of its full response, its client disconnecting, or its
      worker's death.

    Not duplicates: a run the SIGKILLed worker had started but not finished, run again by another worker
    (*rerun*: the redelivery the design promises); a retry after a failed attempt (not a 200); a request the
    simulator received twice from one worker one after the other, the first failing.
    """

    def __init__(self, config: SimulatorConfig) -> None:
        self.config_at_start = config
        self.inner = create_app(config)
        self.received: Counter[str] = Counter()
        self.completed: Counter[str] = Counter()
        self.runs: dict[str, list[Run]] = {}
        self._lock = threading.Lock()
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    async def app(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not scope["path"].endswith(("/chat/completions", "/embeddings")):
            await self.inner(scope, receive, send)
            return
        chunks: list[bytes] = []
        more = True
        while more:
            message = await receive()
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        body = b"".join(chunks)
        try:
            parsed = json.loads(body)
            key = json.dumps(parsed.get("messages") or parsed.get("input"), sort_keys=True)
        except ValueError:
            key = "?"
        headers = {name.decode("latin-1").lower(): value.decode("latin-1") for name, value in scope["headers"]}
        identity = headers.get("authorization", "").removeprefix("Bearer ").strip() or "?"
        run = Run(identity, time.monotonic())
        with self._lock:
            self.received[key] += 1
            self.runs.setdefault(key, []).append(run)
        sent = False

        def client_gone() -> None:
            with self._lock:
                if not run.complete and run.ended is None:
                    run.ended, run.disconnected = time.monotonic(), True

        async def counting_send(message: dict[str, Any]) -> None:
            if message.get("type") == "http.response.start":
                run.status = int(message.get("status", 0))
            final = message.get("type") == "http.response.body" and not message.get("more_body", False)
            if final:  # marked before sending: the server's own end-of-response wake-up is not a disconnect
                with self._lock:
                    if not run.disconnected:
                        run.ended, run.complete = time.monotonic(), True
                    self.completed[key] += 1
            await send(message)

        async def replay() -> dict[str, Any]:
            nonlocal sent
            if sent:
                message = await receive()
                if message.get("type") == "http.disconnect":
                    client_gone()
                return dict(message)
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        async def watch_disconnect() -> None:  # the client gone before the response ended: the run ends there
            if (await receive()).get("type") == "http.disconnect":
                client_gone()

        watcher = asyncio.ensure_future(watch_disconnect())
        try:
            await self.inner(scope, replay, counting_send)
        finally:
            watcher.cancel()

    def start(self) -> None:
        config = uvicorn.Config(
            self.app,
            host="127.0.0.1",
            port=self.port,
            log_level="error",
            access_log=False,
            lifespan="off",
            interface="asgi3",
            timeout_graceful_shutdown=1,
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name="counting-sim", daemon=True)
        self._thread.start()
        wait_until(lambda: self._server is not None and self._server.started, 10, "simulator up")

    def stop(self) -> None:
        self._close_control()
        if self._server is not None and self._thread is not None:
            self._server.should_exit = True
            self._thread.join(5)
            if self._thread.is_alive():
                self._server.force_exit = True
                self._thread.join(5)
        self._server = self._thread = None

    def _of(self, prompts: list[str]) -> list[list[float]]:
        """Start times of every run of each of these requests."""
        return [[run.started for run in runs] for runs in self._runs_of(prompts)]

    def _runs_of(self, prompts: list[str]) -> list[list[Run]]:
        keys = {json.dumps([{"role": "user", "content": p}], sort_keys=True) for p in prompts}
        with self._lock:
            return [list(runs) for key, runs in self.runs.items() if key in keys]

    def duplicated(self, prompts: list[str]) -> int:
        """Requests with a duplicated effect, by the rule in the class docstring."""
        return sum(1 for runs in self._runs_of(prompts) if _duplicated(runs))

    def reruns(self, prompts: list[str]) -> int:
        """Requests a SIGKILLed worker had started and not finished, run again by another worker."""
        count = 0
        for runs in self._runs_of(prompts):
            cut = [r for r in runs if r.identity in KILLED and not r.delivered()]
            if any(other.identity != r.identity and other.started >= r.started for r in cut for other in runs):
                count += 1
        return count

    def completed_for(self, prompt: str) -> int:
        """How many times a chat with this one user message was answered in full."""
        key = json.dumps([{"role": "user", "content": prompt}], sort_keys=True)
        with self._lock:
            return self.completed[key]

    def ran(self, prompt: str) -> int:
        """How many times a chat with this one user message reached the simulator."""
        key = json.dumps([{"role": "user", "content": prompt}], sort_keys=True)
        with self._lock:
            return self.received[key]


def _duplicated(runs: list[Run]) -> bool:
    """Delivered more than once, or run by two different live workers at overlapping times."""
    if sum(run.delivered() for run in runs) > 1:
        return True
    for index, first in enumerate(runs):
        for second in runs[index + 1 :]:
            if first.identity == second.identity:
                continue
            if first.started < second.live_until() and second.started < first.live_until():
                return True
    return False


def simulator_config(**overrides: Any) -> SimulatorConfig:
    base = SimulatorConfig(
        models=[ServedModel(name=CHAT_MODEL, max_model_len=32768), ServedModel(name=EMBED_MODEL, kind="embed")],
        dev_mode=True,
        max_running=1024,
        output_tokens=8,
    )
    return SimulatorConfig.model_validate({**base.model_dump(), **overrides})


# ------------------------------------------------------------------------------------------------ settings


def fault_settings(
    *,
    broker_url: str,
    backend_url: str,
    state_url: str,
    prefix: str,
    security: SecuritySettings,
    instances: dict[str, str],
    concurrency: int = 64,
    **overrides: Any,
) -> Settings:
    """Fleet settings for a fault scenario: the defaults that matter for recovery, short heartbeats."""
    values: dict[str, Any] = {
        "broker_url": broker_url,
        "result_backend": backend_url,
        "redis_url": state_url,
        "key_prefix": prefix,
        "instances": {
            name: InstanceSettings(name=name, base_url=url + "/v1", concurrency=concurrency)
            for name, url in instances.items()
        },
        "probe_localhost": False,
        "timeouts": Timeouts(chat_s=30, stream_s=30, embed_s=10, management_s=5),
        "lanes": LaneSettings(max_length=10_000, message_ttl_s=120, delivery_limit=3),
        "security": security,
        "heartbeat_interval_s": 1.0,
        "registry_ttl_s": 5.0,
        "retry_base_delay_s": 0.1,
        "retry_max_delay_s": 1.0,
        "capacity_check_interval_s": 0.5,
        "circuit_half_open_after_s": 2.0,
        "result_expires_s": 600,
    }
    values.update(overrides)
    return Settings(**values)


class Worker:
    """A real ``celery worker`` process, configured only through ``VLLM_FLEET_*`` variables.

    Each has its own ``identity``: the bearer token (``api_key``) of every instance in its settings, so the
    simulator knows which worker process sent each call (``CountingSimulator``'s duplicate rule).
    """

    def __init__(self, settings: Settings, name: str, *, concurrency: int, processes: int = 1) -> None:
        from tasks.cli import worker_group_argv, worker_process_argv

        self.identity = f"vft-worker-{name}-{secrets.token_hex(4)}"
        own = settings.model_copy(
            update={
                "instances": {
                    key: instance.model_copy(update={"api_key": SecretStr(self.identity)})
                    for key, instance in settings.instances.items()
                }
            }
        )
        env = {**os.environ, **own.to_env(), "PYTHONUNBUFFERED": "1"}
        self.name = name
        self._log = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 - a file: a chatty worker never blocks
        argv = worker_process_argv(name, concurrency) if processes == 1 else worker_group_argv(name, processes)
        self.process = subprocess.Popen(
            argv, env=env, stdout=subprocess.DEVNULL, stderr=self._log, text=True, start_new_session=True
        )

    def logs(self) -> str:
        self._log.flush()
        self._log.seek(0)
        return self._log.read()

    def alive(self) -> bool:
        return self.process.poll() is None

    def kill(self) -> None:
        """SIGKILL the whole process group: no warm shutdown, no acks."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            with _KILLED_LOCK:
                KILLED.setdefault(self.identity, time.monotonic())
        self.process.wait(10)

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()


# --------------------------------------------------------------------------------------------------- tally


@dataclass
class Tally:
    """What became of every submitted request of one scenario."""

    scenario: str
    submitted: int = 0
    ok: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    lost: int = 0
    duplicated: int = 0
    wrong: int = 0
    recover_s: float | None = None
    latencies_s: list[float] = field(default_factory=list)
    notes: dict[str, Any] = field(default_factory=dict)

    def row(self) -> dict[str, Any]:
        lat = sorted(self.latencies_s)
        return {
            "scenario": self.scenario,
            "profile": PROFILE,
            "submitted": self.submitted,
            "ok": self.ok,
            "errors": dict(self.errors),
            "lost": self.lost,
            "duplicated": self.duplicated,
            "wrong": self.wrong,
            "recover_s": None if self.recover_s is None else round(self.recover_s, 2),
            "p50_s": round(lat[len(lat) // 2], 3) if lat else None,
            "p99_s": round(lat[min(len(lat) - 1, int(len(lat) * 0.99))], 3) if lat else None,
            **self.notes,
        }

    def report(self) -> None:
        """Append this scenario's row to ``VFT_RELIABILITY_REPORT`` (JSON lines) when set; print it."""
        row = self.row()
        print(json.dumps(row))
        path = os.environ.get("VFT_RELIABILITY_REPORT")
        if path:
            with open(path, "a") as out:
                out.write(json.dumps(row) + "\n")


def collect(
    tally: Tally, futures: dict[str, tuple[Future[Any], float]], margin_s: float, check: Callable[[str, Any], bool]
) -> None:
    """Wait for every request's answer (each by its deadline + margin); count OK, typed errors, lost, wrong."""
    for prompt, (future, deadline) in futures.items():
        try:
            reply = future.result(timeout=max(0.1, deadline - time.time() + margin_s))
        except FutureTimeout:
            tally.lost += 1
            continue
        except FleetError as exc:
            tally.errors[exc.code] += 1
            continue
        except Exception as exc:
            tally.errors[f"untyped:{type(exc).__name__}"] += 1
            continue
        tally.ok += 1
        if not check(prompt, reply):
            tally.wrong += 1


@contextmanager
def caller_pool(size: int) -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(max_workers=size, thread_name_prefix="caller") as pool:
        yield pool
