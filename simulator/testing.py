"""Running the simulator for tests: in a background thread (``SimulatorServer``) or a child process.

Both bind 127.0.0.1 on a free port, expose ``.url``, and steer the running simulator through its ``/_sim``
routes (``configure``, ``stats``, ``reset``)::

    with SimulatorServer(SimulatorConfig(itl_s=0.01)) as sim:
        sim.configure(max_queued=1)
        httpx.post(f"{sim.url}/v1/chat/completions", json=...)
"""

from __future__ import annotations

import os
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Self

import httpx
import uvicorn

from simulator.app import create_app
from simulator.cli import READY_PREFIX
from simulator.config import SimulatorConfig

__all__ = ["READY_PREFIX", "SimulatorProcess", "SimulatorServer"]

HOST = "127.0.0.1"
START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 5.0
START_POLL_S = 0.005
GRACEFUL_SHUTDOWN_S = 1
CONTROL_TIMEOUT_S = 10.0


class _Controlled:
    """The ``/_sim`` control calls shared by both ways of running the simulator."""

    url: str
    _control: httpx.Client | None = None

    def _http(self) -> httpx.Client:
        """The client for control calls, kept open while the simulator runs."""
        if self._control is None:
            self._control = httpx.Client(base_url=self.url, timeout=CONTROL_TIMEOUT_S)
        return self._control

    def _close_control(self) -> None:
        """Close the control client."""
        if self._control is not None:
            self._control.close()
            self._control = None

    def _call(self, method: str, path: str, patch: dict[str, Any] | None = None) -> dict[str, Any]:
        """One control call; its JSON answer."""
        response = self._http().request(method, path, json=patch)
        response.raise_for_status()
        result: dict[str, Any] = response.json()
        return result

    def configure(self, **patch: Any) -> dict[str, Any]:
        """Merge ``patch`` into the live config (``POST /_sim/config``) and return the new config."""
        return self._call("POST", "/_sim/config", patch)

    def config(self) -> dict[str, Any]:
        """The live config."""
        return self._call("GET", "/_sim/config")

    def stats(self) -> dict[str, Any]:
        """The counters of ``GET /_sim/stats``."""
        return self._call("GET", "/_sim/stats")

    def reset(self) -> None:
        """Back to the start config with zeroed counters (``POST /_sim/reset``)."""
        self._call("POST", "/_sim/reset")


class SimulatorServer(_Controlled):
    """The simulator under uvicorn in a background thread, on 127.0.0.1 and a free port."""

    def __init__(self, config: SimulatorConfig | None = None, **overrides: Any) -> None:
        base = config if config is not None else SimulatorConfig()
        if overrides:
            base = SimulatorConfig.model_validate({**base.model_dump(), **overrides})
        self.config_at_start = base
        self.app = create_app(self.config_at_start)
        self.url = ""
        self.port = 0
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start serving and wait until the port is bound."""
        config = uvicorn.Config(
            self.app,
            host=HOST,
            port=0,
            log_level="warning",
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
        )
        server = uvicorn.Server(config)
        thread = threading.Thread(target=server.run, name="vllm-simulator", daemon=True)
        thread.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the simulator did not start")
            time.sleep(START_POLL_S)
        self.port = server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://{HOST}:{self.port}"
        self._server, self._thread = server, thread

    def stop(self) -> None:
        """Stop serving (requests still running are cancelled after a short grace period)."""
        self._close_control()
        if self._server is None or self._thread is None:
            return
        self._server.should_exit = True
        self._thread.join(STOP_TIMEOUT_S)
        if self._thread.is_alive():
            self._server.force_exit = True
            self._thread.join(STOP_TIMEOUT_S)
        self._server = self._thread = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.stop()


def _read_lines(stream: IO[str], lines: queue.Queue[str]) -> None:
    """Copy a child's output lines into ``lines`` until it closes."""
    for line in stream:
        lines.put(line)


class SimulatorProcess(_Controlled):
    """``vllm-sim`` in a child process (``args`` are its command-line options; the port is picked for it)."""

    def __init__(self, args: list[str] | None = None) -> None:
        self.args = list(args or [])
        self.url = ""
        self.process: subprocess.Popen[str] | None = None

    def start(self) -> None:
        """Start the child and wait for its ready line, which names its URL."""
        command = [sys.executable, "-m", "simulator.cli", "--host", HOST, "--port", "0", *self.args]
        source_root = str(Path(__file__).resolve().parents[1])
        python_path = os.pathsep.join(filter(None, [source_root, os.environ.get("PYTHONPATH")]))
        environment = {**os.environ, "PYTHONPATH": python_path}
        process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=environment)
        self.process = process
        assert process.stdout is not None
        lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=_read_lines, args=(process.stdout, lines), daemon=True).start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            remaining = deadline - time.monotonic()
            try:
                line = lines.get(timeout=max(remaining, 0.0))
            except queue.Empty:
                self.stop()
                raise RuntimeError("the simulator process did not start") from None
            if line.startswith(READY_PREFIX):
                self.url = line[len(READY_PREFIX) :].strip()
                return

    @property
    def pid(self) -> int:
        """The child's process id."""
        assert self.process is not None
        return self.process.pid

    def kill(self) -> None:
        """Kill the child at once (a crashed server)."""
        if self.process is not None:
            self.process.kill()
            self.process.wait(STOP_TIMEOUT_S)

    def stop(self) -> None:
        """Stop the child: terminate, then kill if it lingers."""
        self._close_control()
        process = self.process
        if process is None:
            return
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(STOP_TIMEOUT_S)
        self.process = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.stop()
