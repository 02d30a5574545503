"""Bring a local fleet up (or down) and run a sample of each task: what ``make fleet`` runs.

``up`` starts, in the background, the vLLM simulator on port 8000 (unless ``VLLM_URL`` names a real vLLM
server, or something already answers on that port), one worker and Celery Beat, all on the local Redis; it
generates keys under ``.run/keys`` on first use, writes ``.run/env`` (``source .run/env`` to use
``vllm-fleet`` against this fleet), waits for the worker's offerings, then with ``--sample`` runs a chat, a
stream, an embedding and a health check on every instance. ``down`` stops what ``up`` started.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RUN = Path(os.environ.get("FLEET_RUN_DIR", ROOT / ".run"))
BIN = Path(sys.executable).parent
SIM_PORT = int(os.environ.get("FLEET_SIM_PORT", "8000"))
FLOWER_PORT = int(os.environ.get("FLEET_FLOWER_PORT", "5555"))
START_TIMEOUT_S = 60.0


def _log(message: str) -> None:
    print(f"[fleet] {message}", flush=True)


def _answers(url: str) -> bool:
    import httpx

    try:
        return httpx.get(f"{url}/health", timeout=0.5).status_code == 200
    except httpx.HTTPError:
        return False


def _spawn(name: str, argv: list[str], env: dict[str, str]) -> None:
    log = (RUN / f"{name}.log").open("ab")
    process = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    (RUN / f"{name}.pid").write_text(str(process.pid))
    _log(f"started {name} (pid {process.pid}, log {RUN / f'{name}.log'})")


def _wait(predicate: object, what: str, timeout_s: float = START_TIMEOUT_S) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.2)
    raise SystemExit(f"[fleet] {what} did not happen within {timeout_s:.0f} s; see the logs in {RUN}")


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
    if not (keys / "signing").exists() or not (keys / "worker").exists():
        subprocess.run(
            [str(BIN / "vllm-fleet"), "keys", "generate", "--dir", str(keys)], check=True, stdout=subprocess.DEVNULL
        )
    return {
        "VLLM_FLEET_SECURITY__SIGNING_KID": "k1",
        "VLLM_FLEET_SECURITY__SIGNING_KEY_FILE": str(keys / "signing" / "k1.pem"),
        "VLLM_FLEET_SECURITY__VERIFY_KEYS_DIR": str(keys / "verify"),
        "VLLM_FLEET_SECURITY__ENCRYPTION_KID": "e1",
        "VLLM_FLEET_SECURITY__ENCRYPTION_KEYS_DIR": str(keys / "sealing"),
        # one env for the workers and the sample producer: the workers' answer key, and what verifies it
        "VLLM_FLEET_SECURITY__RESPONSE_SIGNING_KID": "w1",
        "VLLM_FLEET_SECURITY__RESPONSE_SIGNING_KEY_FILE": str(keys / "worker" / "w1.pem"),
        "VLLM_FLEET_SECURITY__RESPONSE_VERIFY_KEYS_DIR": str(keys / "response-verify"),
    }


def up(sample: bool) -> None:
    """Start the fleet in the background and optionally run the sample jobs."""
    RUN.mkdir(parents=True, exist_ok=True)
    fleet_env = _keys_env()
    vllm_url = os.environ.get("VLLM_URL", "").rstrip("/")
    if not vllm_url:
        vllm_url = f"http://127.0.0.1:{SIM_PORT}"
        if _answers(vllm_url):
            _log(f"a server already answers on {vllm_url}: using it")
        else:
            _spawn(
                "simulator",
                [
                    str(BIN / "vllm-sim"),
                    "--port",
                    str(SIM_PORT),
                    "--model",
                    "qwen3-6-27b:32768",
                    "--embed-model",
                    "minilm:256",
                ],
                dict(os.environ),
            )
            _wait(lambda: _answers(vllm_url), "the simulator answering")
    fleet_env.setdefault(
        "VLLM_FLEET_INSTANCES",
        os.environ.get("VLLM_FLEET_INSTANCES") or json.dumps({"local": {"base_url": vllm_url, "concurrency": 16}}),
    )
    fleet_env["VLLM_FLEET_PROBE_LOCALHOST"] = "false"
    for name in ("VLLM_FLEET_BROKER_URL", "VLLM_FLEET_RESULT_BACKEND", "VLLM_FLEET_REDIS_URL", "VLLM_FLEET_KEY_PREFIX"):
        if name in os.environ:
            fleet_env[name] = os.environ[name]
    (RUN / "env").write_text("".join(f"export {k}='{v}'\n" for k, v in fleet_env.items()))
    env = {**os.environ, **fleet_env}
    _spawn("worker", [str(BIN / "vllm-fleet"), "worker", "--hostname", "local@%h", "--loglevel", "INFO"], env)
    _spawn("beat", [str(BIN / "vllm-fleet"), "beat", "--schedule", str(RUN / "beat-schedule")], env)
    flower_auth = _flower_auth()
    _spawn(
        "flower",
        [str(BIN / "celery"), "-A", "tasks.app", "flower", f"--port={FLOWER_PORT}", "--address=127.0.0.1"],
        {**env, "FLOWER_BASIC_AUTH": flower_auth},
    )
    os.environ.update(fleet_env)

    from tasks.runtime import runtime

    _wait(lambda: len(runtime().registry.all()) > 0, "the worker registering its offerings")
    _log("fleet is up; `source .run/env` to use `vllm-fleet` against it, `make stop` to stop it")
    _log(f"Flower: http://127.0.0.1:{FLOWER_PORT} (user and password in {RUN / 'flower-auth'})")
    if sample:
        run_sample()


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


def down() -> None:
    """Stop every process ``up`` started."""
    for pid_file in sorted(RUN.glob("*.pid")):
        pid = int(pid_file.read_text())
        try:
            os.killpg(pid, signal.SIGTERM)
            _log(f"stopped {pid_file.stem} (pid {pid})")
        except ProcessLookupError:
            pass
        pid_file.unlink()


def main() -> None:
    """``fleet.py up [--sample]`` or ``fleet.py down``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["up", "down", "sample"])
    parser.add_argument("--sample", action="store_true", help="run a chat, a stream, an embedding and a health check")
    args = parser.parse_args()
    if args.action == "up":
        up(args.sample)
    elif args.action == "sample":
        os.environ.update(_read_env())
        run_sample()
    else:
        down()


def _read_env() -> dict[str, str]:
    values: dict[str, str] = {}
    for line in (RUN / "env").read_text().splitlines():
        name, _, value = line.removeprefix("export ").partition("=")
        values[name] = value.strip("'")
    return values


if __name__ == "__main__":
    main()
