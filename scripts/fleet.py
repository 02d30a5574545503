"""Bring a local fleet up (or down) and run a sample of each task: what ``make fleet`` runs.

``up`` starts, in the background, the vLLM simulator on port 8000 (unless ``VLLM_URL`` names a real vLLM
server, or a vLLM already answers on that port), one worker, Celery Beat and Flower, all on the local Redis; it
generates keys under ``.run/keys`` on first use, writes ``.run/env`` (``source .run/env`` puts ``vllm-fleet``
on PATH and points it at this fleet), waits for the worker's offerings, then with ``--sample`` runs a chat, a
stream, an embedding and a health check on every instance. Run again, ``up`` reuses the fleet when all of it
still runs with the same settings, and restarts it otherwise (so there is only ever one Beat). A port in use,
a ``VLLM_URL`` that does not answer or a process that exits fails in seconds with the reason, and stops what
was started. ``down`` stops every process ``up`` started (found by pid file and by a marker in their
environment), and needs nothing but the standard library.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RUN = Path(os.environ.get("FLEET_RUN_DIR", ROOT / ".run")).resolve()
BIN = Path(sys.executable).parent
SIM_PORT = int(os.environ.get("FLEET_SIM_PORT", "8000"))
FLOWER_PORT = int(os.environ.get("FLEET_FLOWER_PORT", "5555"))
MARK = "VLLM_FLEET_RUN_DIR_MARK"  # set in the environment of every process `up` starts: `down` finds them by it
SERVICES = ("simulator", "worker", "beat", "flower")
START_TIMEOUT_S = 60.0
SIMULATOR_TIMEOUT_S = 30.0
FLOWER_TIMEOUT_S = 30.0
PROBE_TIMEOUT_S = 2.0
PROBE_TRIES = 3
STOP_TIMEOUT_S = 20.0
LOG_TAIL_LINES = 5
READY_PREFIX = "vllm-sim ready "  # simulator.cli.READY_PREFIX, printed once its port is bound


class FleetStartError(Exception):
    """``up`` cannot bring the fleet up; the message says why and what to do."""


def _log(message: str) -> None:
    print(f"[fleet] {message}", flush=True)


# --- processes ---------------------------------------------------------------------------------------------


def _proc_state(pid: int) -> str | None:
    """The process' state letter from /proc (None: no such process, or no /proc here)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[0]


def _is_ours(pid: int) -> bool:
    """Whether ``pid`` is a live process ``up`` started for this run directory (not a reused pid, not a zombie)."""
    if Path("/proc").is_dir():
        if _proc_state(pid) in (None, "Z", "X"):
            return False
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            return False
        return f"{MARK}={RUN}".encode() in environ
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def _marked_pids() -> set[int]:
    """Every live process carrying this run directory's marker (started by ``up``, pid file or not)."""
    proc = Path("/proc")
    if not proc.is_dir():
        return set()
    found = {int(entry.name) for entry in proc.iterdir() if entry.name.isdigit()}
    return {pid for pid in found if pid != os.getpid() and _is_ours(pid)}


def _running() -> dict[str, int]:
    """The services whose pid file names a live process of ours."""
    running: dict[str, int] = {}
    for name in SERVICES:
        path = RUN / f"{name}.pid"
        with contextlib.suppress(OSError, ValueError):
            pid = int(path.read_text())
            if _is_ours(pid):
                running[name] = pid
    return running


def _spawn(name: str, argv: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    with (RUN / f"{name}.log").open("ab") as log:
        process = subprocess.Popen(
            argv, env={**env, MARK: str(RUN)}, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    (RUN / f"{name}.pid").write_text(str(process.pid))
    _log(f"started {name} (pid {process.pid}, log {RUN / f'{name}.log'})")
    return process


def _log_tail(name: str) -> str:
    try:
        lines = (RUN / f"{name}.log").read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return "\n".join(f"    {line}" for line in lines[-LOG_TAIL_LINES:])


def _wait(
    predicate: Callable[[], bool], what: str, started: dict[str, subprocess.Popen[bytes]], timeout_s: float
) -> None:
    """Poll ``predicate``; fail at once when a started process exits, or when the time is up."""
    deadline = time.monotonic() + timeout_s
    while True:
        for name, process in started.items():
            if process.poll() is not None:
                raise FleetStartError(
                    f"{name} exited with status {process.returncode} while waiting for {what}; "
                    f"the end of {RUN / f'{name}.log'}:\n{_log_tail(name)}"
                )
        if predicate():
            return
        if time.monotonic() > deadline:
            raise FleetStartError(f"{what} did not happen within {timeout_s:.0f} s; see the logs in {RUN}")
        time.sleep(0.2)


# --- checks before starting anything -----------------------------------------------------------------------


def _port_in_use(port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(PROBE_TIMEOUT_S)
        return probe.connect_ex(("127.0.0.1", port)) == 0


def _health(url: str, tries: int = PROBE_TRIES) -> str | None:
    """None when ``url`` answers ``GET /health`` with 200, else what went wrong (tried a few times)."""
    import httpx

    problem = "no answer"
    for attempt in range(tries):
        try:
            status = httpx.get(f"{url}/health", timeout=PROBE_TIMEOUT_S).status_code
        except httpx.HTTPError as exc:
            problem = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        else:
            if status == 200:
                return None
            problem = f"GET /health answered {status}"
        if attempt + 1 < tries:
            time.sleep(0.5)
    return problem


def _check_redis(env: dict[str, str]) -> None:
    import redis

    urls = {
        env.get("VLLM_FLEET_BROKER_URL", "redis://127.0.0.1:6379/0"),
        env.get("VLLM_FLEET_REDIS_URL", "redis://127.0.0.1:6379/2"),
    }
    for url in sorted(u for u in urls if u.startswith(("redis://", "rediss://"))):
        client = redis.Redis.from_url(url, socket_connect_timeout=PROBE_TIMEOUT_S, socket_timeout=PROBE_TIMEOUT_S)
        try:
            client.ping()
        except redis.RedisError as exc:
            shown = url.split("@")[-1]  # never print a password
            raise FleetStartError(f"Redis at {shown} does not answer ({exc}); start it (`make services`)") from exc
        finally:
            client.close()


def _vllm_url(requested: str) -> tuple[str, bool]:
    """The vLLM URL to serve, and whether the simulator must be started for it; fails fast when unusable."""
    if requested:
        problem = _health(requested)
        if problem:
            raise FleetStartError(
                f"VLLM_URL={requested} does not answer ({problem}); check that vLLM runs there and is reachable "
                "from here, or unset VLLM_URL to use the bundled simulator"
            )
        return requested, False
    url = f"http://127.0.0.1:{SIM_PORT}"
    if not _port_in_use(SIM_PORT):
        return url, True
    problem = _health(url, tries=1)
    if problem:
        raise FleetStartError(
            f"port {SIM_PORT} is in use by a program that is not a vLLM server ({problem}); stop it, "
            "or set FLEET_SIM_PORT=<free port> for the simulator, or VLLM_URL=<your vLLM server>"
        )
    _log(f"a vLLM server already answers on {url}: using it")
    return url, False


# --- up ------------------------------------------------------------------------------------------------------


def _flower_auth() -> str:
    """Flower's basic-auth pair: FLOWER_BASIC_AUTH, else one generated once and kept under .run/."""
    path = RUN / "flower-auth"
    if os.environ.get("FLOWER_BASIC_AUTH"):
        return os.environ["FLOWER_BASIC_AUTH"]
    if not path.exists():
        path.write_text(f"admin:{secrets.token_urlsafe(12)}\n")
        path.chmod(0o600)
    return path.read_text().strip()


def _keys_env() -> dict[str, str]:
    keys = RUN / "keys"
    if not (keys / "signing" / "k1.pem").exists() or not (keys / "worker" / "w1.pem").exists():
        if keys.exists():  # keys from an older `make fleet` (no worker key): a local fleet makes a whole new set
            shutil.rmtree(keys)
        generated = subprocess.run(
            [str(BIN / "vllm-fleet"), "keys", "generate", "--dir", str(keys)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        if generated.returncode != 0:
            reason = "\n".join(generated.stderr.strip().splitlines()[-LOG_TAIL_LINES:])
            raise FleetStartError(f"could not generate keys under {keys}:\n{reason}")
    return {
        "VLLM_FLEET_SECURITY__SIGNING_KID": "k1",
        "VLLM_FLEET_SECURITY__SIGNING_KEY_FILE": str(keys / "signing" / "k1.pem"),
        "VLLM_FLEET_SECURITY__VERIFY_KEYS_DIR": str(keys / "verify"),
        "VLLM_FLEET_SECURITY__ENCRYPTION_KID": "e1",
        "VLLM_FLEET_SECURITY__ENCRYPTION_KEYS_DIR": str(keys / "sealing"),
        "VLLM_FLEET_SECURITY__RESPONSE_VERIFY_KEYS_DIR": str(keys / "response-verify"),
    }


def _worker_only_env() -> dict[str, str]:
    """What only workers hold: the key that signs their answers (producers, Beat and .run/env never get it)."""
    return {
        "VLLM_FLEET_SECURITY__RESPONSE_SIGNING_KID": "w1",
        "VLLM_FLEET_SECURITY__RESPONSE_SIGNING_KEY_FILE": str(RUN / "keys" / "worker" / "w1.pem"),
    }


def _worker_env(env: dict[str, str]) -> dict[str, str]:
    """A worker's environment: the producers' less the request signing key, plus the answer signing key."""
    worker = {name: value for name, value in env.items() if name != "VLLM_FLEET_SECURITY__SIGNING_KEY_FILE"}
    return {**worker, **_worker_only_env()}


def _write_env(fleet_env: dict[str, str]) -> None:
    lines = [f"export PATH='{BIN}':\"$PATH\"\n"]  # the venv's vllm-fleet, celery and python first
    lines += [f"export {name}='{value}'\n" for name, value in fleet_env.items()]
    (RUN / "env").write_text("".join(lines))


def _read_env() -> dict[str, str]:
    values: dict[str, str] = {}
    for line in (RUN / "env").read_text().splitlines():
        name, _, value = line.removeprefix("export ").partition("=")
        if name != "PATH":
            values[name] = value.strip("'")
    return values


def _user_instances() -> str:
    """VLLM_FLEET_INSTANCES as the user set it (not the value a sourced .run/env exported)."""
    value = os.environ.get("VLLM_FLEET_INSTANCES", "")
    with contextlib.suppress(OSError):
        if value and value == _read_env().get("VLLM_FLEET_INSTANCES"):
            return ""
    return value


def _settings_of_run(vllm_url: str) -> dict[str, Any]:
    """What a running fleet was started with: a change means restarting it."""
    names = ("VLLM_FLEET_BROKER_URL", "VLLM_FLEET_RESULT_BACKEND", "VLLM_FLEET_REDIS_URL", "VLLM_FLEET_KEY_PREFIX")
    return {
        "vllm_url": vllm_url,
        "instances": _user_instances(),
        "flower_port": FLOWER_PORT,
        "sim_port": SIM_PORT,
        **{name: os.environ.get(name, "") for name in names},
    }


def _reuse() -> bool:
    """Whether the fleet of an earlier ``up`` still runs whole with today's settings (else it is stopped)."""
    running = _running()
    if not running and not _marked_pids():
        return False
    try:
        before = json.loads((RUN / "fleet.json").read_text())
    except (OSError, ValueError):
        before = {}
    expected = {"worker", "beat", "flower", *(["simulator"] if before.get("simulator") else [])}
    requested = os.environ.get("VLLM_URL", "").rstrip("/")
    same = before.get("settings") == _settings_of_run(requested) and (RUN / "env").exists()
    if same and set(running) == expected:
        shown = ", ".join(f"{name} pid {pid}" for name, pid in sorted(running.items()))
        _log(f"the fleet is already up ({shown}): reusing it")
        return True
    reason = "its settings changed" if not same else f"only {', '.join(sorted(running)) or 'stray processes'} run"
    _log(f"restarting the fleet of an earlier `make fleet` ({reason})")
    down()
    return False


def up(sample: bool) -> None:
    """Start the fleet in the background (or reuse the running one) and optionally run the sample jobs."""
    RUN.mkdir(parents=True, exist_ok=True)
    if _reuse():
        os.environ.update(_read_env())
    else:
        try:
            _start()
        except (FleetStartError, KeyboardInterrupt) as exc:
            down(quiet=True)
            raise SystemExit(f"[fleet] {exc}" if str(exc) else 130) from None
    _log(f"`source {RUN / 'env'}` to use `vllm-fleet` against the fleet; `make stop` stops it")
    _log(f"Flower: http://127.0.0.1:{FLOWER_PORT} (user and password in {RUN / 'flower-auth'})")
    if sample:
        run_sample()


def _start() -> None:
    requested = os.environ.get("VLLM_URL", "").rstrip("/")
    fleet_env = _keys_env()
    for name in ("VLLM_FLEET_BROKER_URL", "VLLM_FLEET_RESULT_BACKEND", "VLLM_FLEET_REDIS_URL", "VLLM_FLEET_KEY_PREFIX"):
        if name in os.environ:
            fleet_env[name] = os.environ[name]
    _check_redis(fleet_env)
    if _port_in_use(FLOWER_PORT):
        raise FleetStartError(
            f"port {FLOWER_PORT} (Flower) is in use by another program; stop it, or set FLEET_FLOWER_PORT=<free port>"
        )
    vllm_url, start_simulator = _vllm_url(requested)
    (RUN / "fleet.json").write_text(json.dumps({"simulator": start_simulator, "settings": _settings_of_run(requested)}))
    started: dict[str, subprocess.Popen[bytes]] = {}
    if start_simulator:
        (RUN / "simulator.log").unlink(missing_ok=True)
        argv = [str(BIN / "vllm-sim"), "--port", str(SIM_PORT), "--model", "qwen3-6-27b:32768"]
        started["simulator"] = _spawn("simulator", [*argv, "--embed-model", "minilm:256"], dict(os.environ))
        bound = lambda: READY_PREFIX in _read_log("simulator")  # noqa: E731
        _wait(bound, "the simulator binding its port", started, SIMULATOR_TIMEOUT_S)
    fleet_env["VLLM_FLEET_INSTANCES"] = _user_instances() or json.dumps(
        {"local": {"base_url": vllm_url, "concurrency": 16}}
    )
    fleet_env["VLLM_FLEET_PROBE_LOCALHOST"] = "false"
    _write_env(fleet_env)
    env = {**os.environ, **fleet_env}
    # Task events on from the start, so Flower (up before the sample runs) shows the sample's tasks.
    worker_env = {**_worker_env(env), "VLLM_FLEET_SEND_TASK_EVENTS": "true"}
    worker_argv = [str(BIN / "vllm-fleet"), "worker", "--hostname", "local@%h", "--loglevel", "INFO"]
    started["worker"] = _spawn("worker", worker_argv, worker_env)
    started["beat"] = _spawn("beat", [str(BIN / "vllm-fleet"), "beat", "--schedule", str(RUN / "beat-schedule")], env)
    flower_auth = _flower_auth()
    started["flower"] = _spawn(
        "flower",
        [str(BIN / "celery"), "-A", "tasks.app", "flower", f"--port={FLOWER_PORT}", "--address=127.0.0.1"],
        {**env, "FLOWER_BASIC_AUTH": flower_auth},
    )
    os.environ.update(fleet_env)

    from tasks.runtime import runtime

    _wait(lambda: len(runtime().registry.all()) > 0, "the worker registering its offerings", started, START_TIMEOUT_S)
    _wait(lambda: _flower_sees_worker(flower_auth), "Flower seeing the worker", started, FLOWER_TIMEOUT_S)
    _log("fleet is up")


def _read_log(name: str) -> str:
    try:
        return (RUN / f"{name}.log").read_text(errors="replace")
    except OSError:
        return ""


def _flower_sees_worker(auth: str) -> bool:
    """Whether Flower's event state lists the worker (from here on it records every task event)."""
    import httpx

    user, _, password = auth.partition(":")
    try:
        answer = httpx.get(
            f"http://127.0.0.1:{FLOWER_PORT}/workers?json=1", auth=(user, password), timeout=PROBE_TIMEOUT_S
        )
        workers = answer.json()["data"] if answer.status_code == 200 else []
    except (httpx.HTTPError, ValueError, KeyError):
        return False
    return any(str(worker.get("hostname", "")).startswith("local@") for worker in workers)


def run_sample() -> None:
    """One of each task through the fleet, printed."""
    from tasks import StreamChunk, chat, embed, health, open_stream, stream_chat
    from tasks.runtime import runtime

    offerings = runtime().registry.all()
    chat_model = next(o.model for o in offerings if o.usage_type == "inference")
    embed_model = next((o.model for o in offerings if o.usage_type == "embedding"), None)
    question = [{"role": "user", "content": "Say hello to the fleet"}]

    reply = chat.delay(model=chat_model, messages=question, max_tokens=32).get()
    print(f"chat ({chat_model}): {reply['content']!r} finish={reply['finish_reason']} usage={reply['usage']}")

    print(f"stream ({chat_model}): ", end="", flush=True)
    result = stream_chat.delay(model=chat_model, messages=question, max_tokens=32)
    for item in open_stream(result):
        if isinstance(item, StreamChunk) and item.content:
            print(item.content, end="", flush=True)
    print(f"  [finish={result.get()['finish_reason']}]")

    if embed_model:
        vectors = embed.delay(model=embed_model, input=["hello", "fleet"]).get()["result"]["vectors"]
        print(f"embed ({embed_model}): {len(vectors)} vectors of {len(vectors[0])} dimensions")
    answers = health.delay(instance="all").get()
    for instance, answer in answers.items():
        print(f"health ({instance}): {'live' if answer['ok'] and answer['result']['result']['live'] else answer}")
    print("sample jobs done")


# --- down ----------------------------------------------------------------------------------------------------


def _signal(pid: int, signum: int) -> None:
    try:
        os.killpg(pid, signum)  # each service leads its own session (and process group)
    except (ProcessLookupError, PermissionError):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signum)


def down(*, quiet: bool = False) -> None:
    """Stop every process ``up`` started: warm shutdown first, then SIGKILL what lingers."""
    named = _running()
    pids = set(named.values()) | _marked_pids()
    for name, pid in sorted(named.items()):
        _log(f"stopping {name} (pid {pid})")
    for pid in sorted(pids - set(named.values())):
        _log(f"stopping pid {pid} (started by an earlier `make fleet`)")
    for pid in pids:
        _signal(pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while any(_is_ours(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid in pids:
        if _is_ours(pid):
            _log(f"pid {pid} did not stop within {STOP_TIMEOUT_S:.0f} s: killing it")
            _signal(pid, signal.SIGKILL)
    for name in SERVICES:
        (RUN / f"{name}.pid").unlink(missing_ok=True)
    if not pids and not quiet:
        _log("nothing to stop")


def main() -> None:
    """``fleet.py up [--sample]``, ``fleet.py sample`` or ``fleet.py down``."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("action", choices=["up", "down", "sample"], help="start (or reuse), stop, or run the sample")
    parser.add_argument("--sample", action="store_true", help="run a chat, a stream, an embedding and a health check")
    args = parser.parse_args()
    if args.action == "up":
        up(args.sample)
    elif args.action == "sample":
        os.environ.update(_read_env())
        run_sample()
    else:
        down()


if __name__ == "__main__":
    main()
