"""``make fleet`` and ``make stop`` as a new user runs them (scripts/fleet.py), with real processes.

Each run is isolated: its own run directory, free ports for the simulator and Flower, a private RabbitMQ vhost as
the broker (its lanes never meet the session's in-process worker), the test Redis databases under a fresh key
prefix. Every process ``up`` starts carries a marker in its environment; the tests look processes up by it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import (
    BACKEND_DB,
    RABBIT_HOST,
    RABBIT_PORT,
    REDIS_HOST,
    REDIS_PORT,
    STATE_DB,
    _rabbitmqctl,
    require_server,
    wait_until,
)

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = [sys.executable, str(ROOT / "scripts" / "fleet.py")]
MARK = "VLLM_FLEET_RUN_DIR_MARK"
VHOST = f"vllm-fleet-make-{os.getpid()}"
SAMPLE_TASKS = {"vllm.chat", "vllm.stream_chat", "vllm.embed", "vllm.health"}
FAIL_FAST_S = 40  # the old script waited 60 s on each of these failures
POLL_S = 20.0


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def marked(run_dir: Path) -> dict[int, str]:
    """Live (non-zombie) processes started by ``up`` for ``run_dir``: pid → command line."""
    found: dict[int, str] = {}
    needle = f"{MARK}={run_dir.resolve()}".encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            if (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X"):
                continue
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                found[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
    return found


@pytest.fixture(scope="module")
def broker_vhost() -> Iterator[str]:
    """A private RabbitMQ vhost for the fleets these tests start."""
    require_server("RabbitMQ", RABBIT_HOST, RABBIT_PORT)
    require_server("Redis", REDIS_HOST, REDIS_PORT)
    _rabbitmqctl("delete_vhost", VHOST, check=False)
    _rabbitmqctl("add_vhost", VHOST)
    _rabbitmqctl("set_permissions", "-p", VHOST, "guest", ".*", ".*", ".*")
    yield f"amqp://guest:guest@{RABBIT_HOST}:{RABBIT_PORT}/{VHOST}"
    _rabbitmqctl("delete_vhost", VHOST, check=False)


@pytest.fixture
def fleet_env(broker_vhost: str, tmp_path: Path) -> Iterator[dict[str, str]]:
    """The environment of an isolated ``make fleet``; whatever it leaves running is stopped afterwards."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("VLLM_FLEET_") and key != "VLLM_URL"}
    env |= {
        "FLEET_RUN_DIR": str(tmp_path / "run"),
        "FLEET_SIM_PORT": str(_free_port()),
        "FLEET_FLOWER_PORT": str(_free_port()),
        "VLLM_FLEET_BROKER_URL": broker_vhost,
        "VLLM_FLEET_RESULT_BACKEND": f"redis://{REDIS_HOST}:{REDIS_PORT}/{BACKEND_DB}",
        "VLLM_FLEET_REDIS_URL": f"redis://{REDIS_HOST}:{REDIS_PORT}/{STATE_DB}",
        "VLLM_FLEET_KEY_PREFIX": f"make-{uuid.uuid4().hex[:8]}",
    }
    yield env
    subprocess.run([*SCRIPT, "down"], env=env, capture_output=True, timeout=60)
    for pid in marked(tmp_path / "run"):  # the test failed half-way: never leave a process behind
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, 9)


def make(target: str, env: dict[str, str], cwd: Path = ROOT, timeout: float = 150) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["make", "--no-print-directory", "-C", str(cwd), target],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def up(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """``fleet.py up --sample``: what ``make fleet`` runs after installing and starting Redis."""
    return subprocess.run([*SCRIPT, "up", "--sample"], env=env, capture_output=True, text=True, timeout=FAIL_FAST_S)


def pids(run_dir: Path) -> dict[str, int]:
    return {path.stem: int(path.read_text()) for path in run_dir.glob("*.pid")}


def flower_task_names(env: dict[str, str]) -> set[str]:
    user, _, password = (Path(env["FLEET_RUN_DIR"]) / "flower-auth").read_text().strip().partition(":")
    url = f"http://127.0.0.1:{env['FLEET_FLOWER_PORT']}/api/tasks"
    return {task["name"] for task in httpx.get(url, auth=(user, password), timeout=5).json().values()}


def poll(predicate: Callable[[], object], what: str) -> None:
    wait_until(predicate, POLL_S, what, interval_s=0.2, ignore=(Exception,))


@pytest.mark.timeout(300)
def test_make_fleet_twice_reuses_the_fleet_and_make_stop_leaves_no_process(fleet_env: dict[str, str]) -> None:
    run_dir = Path(fleet_env["FLEET_RUN_DIR"])
    first = make("fleet", fleet_env)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "sample jobs done" in first.stdout
    started = pids(run_dir)
    assert set(started) == {"simulator", "worker", "beat", "flower"}
    assert set(marked(run_dir)) >= set(started.values())

    # Flower was up, and the worker sent task events, before the sample ran: it lists the sample's tasks.
    poll(lambda: flower_task_names(fleet_env) >= SAMPLE_TASKS, "Flower listing the sample tasks")

    # What a user sources is a producer's: it never holds the key that signs the workers' answers.
    assert "RESPONSE_SIGNING_KEY" not in (run_dir / "env").read_text()
    # `source .run/env` puts the venv's vllm-fleet on PATH (a shell without the venv, as a new user has).
    shell = subprocess.run(
        ["bash", "-c", f"source {run_dir / 'env'} && command -v vllm-fleet && vllm-fleet offerings"],
        env={"PATH": "/usr/bin:/bin", "HOME": os.environ.get("HOME", "/tmp")},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert shell.returncode == 0, shell.stderr
    assert shell.stdout.splitlines()[0] == str(Path(sys.executable).parent / "vllm-fleet")
    assert "llm.fleet.inference.qwen3-6-27b.ctx32768" in shell.stdout

    second = make("fleet", fleet_env)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "the fleet is already up" in second.stdout
    assert "sample jobs done" in second.stdout
    assert pids(run_dir) == started  # the same processes: no second worker, no second Beat
    beats = [cmd for cmd in marked(run_dir).values() if " beat " in f"{cmd} "]
    assert len(beats) == 1, beats

    stop = make("stop", fleet_env)
    assert stop.returncode == 0, stop.stdout + stop.stderr
    assert marked(run_dir) == {}
    for pid in started.values():
        assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]
    assert list(run_dir.glob("*.pid")) == []


def test_make_stop_works_on_a_fresh_clone(tmp_path: Path) -> None:
    clone = tmp_path / "clone"
    ignore = shutil.ignore_patterns(".venv", ".run", ".git", "*.egg-info", ".*_cache", "__pycache__", "results")
    shutil.copytree(ROOT, clone, ignore=ignore)
    assert not (clone / ".venv").exists()
    stop = make("stop", {**os.environ, "FLEET_RUN_DIR": str(clone / ".run")}, cwd=clone, timeout=60)
    assert stop.returncode == 0, stop.stdout + stop.stderr
    assert "[fleet] nothing to stop" in stop.stdout


def test_busy_simulator_port_fails_fast_and_says_so(fleet_env: dict[str, str]) -> None:
    port = int(fleet_env["FLEET_SIM_PORT"])
    with socket.socket() as squatter:  # something that is not vLLM holds the port
        squatter.bind(("127.0.0.1", port))
        squatter.listen()
        done = up(fleet_env)
    assert done.returncode == 1
    assert f"[fleet] port {port} is in use by a program that is not a vLLM server (" in done.stderr
    assert "stop it, or set FLEET_SIM_PORT=<free port> for the simulator, or VLLM_URL=<your vLLM server>" in (
        done.stderr
    )
    assert marked(Path(fleet_env["FLEET_RUN_DIR"])) == {}


def test_busy_flower_port_fails_fast_and_says_so(fleet_env: dict[str, str]) -> None:
    port = int(fleet_env["FLEET_FLOWER_PORT"])
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", port))
        squatter.listen()
        done = up(fleet_env)
    assert done.returncode == 1
    assert f"[fleet] port {port} (Flower) is in use by another program; stop it, or set FLEET_FLOWER_PORT" in (
        done.stderr
    )
    assert marked(Path(fleet_env["FLEET_RUN_DIR"])) == {}


def test_unreachable_vllm_url_fails_fast_and_says_so(fleet_env: dict[str, str]) -> None:
    url = f"http://127.0.0.1:{_free_port()}"
    done = up({**fleet_env, "VLLM_URL": url})
    assert done.returncode == 1
    assert f"[fleet] VLLM_URL={url} does not answer (ConnectError: " in done.stderr
    assert "or unset VLLM_URL to use the bundled simulator" in done.stderr
    assert marked(Path(fleet_env["FLEET_RUN_DIR"])) == {}


def test_a_process_that_exits_during_start_fails_fast_and_everything_started_is_stopped(
    fleet_env: dict[str, str],
) -> None:
    # The worker has no instance to serve and exits; the simulator, Beat and Flower were started meanwhile.
    done = up({**fleet_env, "VLLM_FLEET_INSTANCES": "{}", "VLLM_FLEET_PROBE_LOCALHOST": "false"})
    assert done.returncode == 1
    assert "[fleet] worker exited with status 1 while waiting for the worker registering its offerings" in done.stderr
    assert "no vLLM instance to serve: VLLM_FLEET_INSTANCES is empty" in done.stderr
    assert "started simulator" in done.stdout
    assert "started flower" in done.stdout
    assert marked(Path(fleet_env["FLEET_RUN_DIR"])) == {}


def test_simulator_on_a_busy_port_exits_without_announcing_ready() -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        done = subprocess.run(
            [str(Path(sys.executable).parent / "vllm-sim"), "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert done.returncode != 0
    assert "vllm-sim ready" not in done.stdout + done.stderr
    assert "address already in use" in done.stderr


def test_make_test_installs_a_compose_client_where_none_is(tmp_path: Path) -> None:
    """`make test` runs scripts/services.sh with `compose`, which apt-installs docker-compose when no client is
    found (as .ci/run does): test_compose.py's validation then runs on a fresh machine instead of failing."""
    recipe = subprocess.run(
        ["make", "--no-print-directory", "-n", "-C", str(ROOT), "test"], capture_output=True, text=True, timeout=60
    )
    assert "bash scripts/services.sh redis rabbitmq compose" in recipe.stdout
    bin_dir = tmp_path / "bin"  # a machine without docker or docker-compose; apt-get records what it was asked
    bin_dir.mkdir()
    calls = tmp_path / "apt-calls"
    for name, body in (("apt-get", f'echo "$*" >> {calls}'), ("id", "echo 0")):
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)
    for tool in ("bash", "sh", "cat", "echo"):
        if shutil.which(tool):
            (bin_dir / tool).symlink_to(shutil.which(tool))  # type: ignore[arg-type]
    done = subprocess.run(
        [str(bin_dir / "bash"), str(ROOT / "scripts" / "services.sh"), "compose"],
        env={"PATH": str(bin_dir)},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    assert calls.read_text().splitlines() == ["update -qq", "install -y -qq docker-compose"]
