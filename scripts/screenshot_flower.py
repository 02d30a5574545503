"""Take docs/flower-dashboard.png: a small fleet runs a few jobs while Flower watches, then headless Chromium shoots.

    .venv/bin/python scripts/screenshot_flower.py [--out docs/flower-dashboard.png] [--page tasks]

Needs the local Redis and Chromium (Debian: ``apt-get install -y chromium``). Everything is started from the
command line tools, as an operator would: ``vllm-fleet keys generate``, ``vllm-sim``, ``vllm-fleet worker``,
``celery -A tasks.app flower --basic-auth=...`` and ``vllm-fleet chat/embed``. It needs an empty Redis database
of its own (``--db``, 3 by default: the tests, the benchmarks and ``make fleet`` use others), empties it again
afterwards, and stops everything it started.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import redis

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
AUTH = ("admin", uuid.uuid4().hex[:12])
CHAT_MODEL, EMBED_MODEL = "qwen3-6-27b", "minilm"
PROMPTS = [
    "Summarise the fleet's lane rules",
    "What does a worker check first?",
    "Name three vLLM sampling options",
    "Why are envelopes signed?",
]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait(predicate: object, what: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if predicate():  # type: ignore[operator]
                return
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(0.2)
    raise SystemExit(f"{what} did not happen within {timeout_s:.0f} s")


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    raise SystemExit("no Chromium here: apt-get update && apt-get install -y chromium")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "flower-dashboard.png")
    parser.add_argument("--page", default="tasks", help="Flower page to shoot: tasks, workers, ...")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379")
    parser.add_argument("--db", type=int, default=3, help="an empty Redis database for broker, results and state")
    args = parser.parse_args()
    chromium = _chromium()
    database = redis.Redis.from_url(f"{args.redis}/{args.db}")
    if database.dbsize():
        raise SystemExit(f"Redis database {args.db} is not empty: pick another with --db")

    tmp = Path(tempfile.mkdtemp(prefix="flower-shot-"))
    processes: list[subprocess.Popen[bytes]] = []

    def spawn(name: str, argv: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        log = (tmp / f"{name}.log").open("wb")
        process = subprocess.Popen(argv, env=env, cwd=tmp, stdout=log, stderr=subprocess.STDOUT)
        processes.append(process)
        return process

    try:
        keys = tmp / "keys"
        subprocess.run(
            [str(BIN / "vllm-fleet"), "keys", "generate", "--dir", str(keys)], check=True, capture_output=True
        )
        sim_port, flower_port = _free_port(), _free_port()
        base = {k: v for k, v in os.environ.items() if not k.startswith(("VLLM_FLEET_", "FLOWER_"))}
        fleet = {
            "VLLM_FLEET_BROKER_URL": f"{args.redis}/{args.db}",
            "VLLM_FLEET_RESULT_BACKEND": f"{args.redis}/{args.db}",
            "VLLM_FLEET_REDIS_URL": f"{args.redis}/{args.db}",
            "VLLM_FLEET_KEY_PREFIX": f"flower-shot-{uuid.uuid4().hex[:6]}",
            "VLLM_FLEET_PROBE_LOCALHOST": "false",
            "VLLM_FLEET_SECURITY__ENCRYPTION_KEYS_DIR": str(keys / "sealing"),
        }
        worker_env = {
            **base,
            **fleet,
            "VLLM_FLEET_SECURITY__VERIFY_KEYS_DIR": str(keys / "verify"),
            "VLLM_FLEET_SECURITY__RESPONSE_SIGNING_KEY_FILE": str(keys / "worker" / "w1.pem"),
            "VLLM_FLEET_INSTANCES": json.dumps(
                {"gpu-1": {"base_url": f"http://127.0.0.1:{sim_port}", "concurrency": 8}}
            ),
        }
        producer_env = {
            **base,
            **fleet,
            "VLLM_FLEET_SECURITY__SIGNING_KEY_FILE": str(keys / "signing" / "k1.pem"),
            "VLLM_FLEET_SECURITY__RESPONSE_VERIFY_KEYS_DIR": str(keys / "response-verify"),
        }
        sim_argv = [str(BIN / "vllm-sim"), "--port", str(sim_port), "--model", f"{CHAT_MODEL}:32768"]
        sim_argv += ["--embed-model", f"{EMBED_MODEL}:256", "--text-mode", "lorem"]
        spawn("simulator", [*sim_argv, "--itl-ms", "15", "--output-tokens", "24"], base)
        _wait(lambda: httpx.get(f"http://127.0.0.1:{sim_port}/health").status_code == 200, "the simulator answering")
        spawn("worker", [str(BIN / "vllm-fleet"), "worker", "--hostname", "gpu-1@%h"], worker_env)
        flower_argv = [str(BIN / "celery"), "-A", "tasks.app", "flower", f"--port={flower_port}"]
        flower_argv += ["--address=127.0.0.1", f"--basic-auth={AUTH[0]}:{AUTH[1]}"]
        flower_argv += ["--tasks-columns=name,state,args,received,runtime,worker"]  # args: the redacted summary
        spawn("flower", flower_argv, {**base, **fleet})
        flower = f"http://127.0.0.1:{flower_port}"
        node = f"gpu-1@{socket.gethostname()}"
        _wait(
            lambda: httpx.get(f"{flower}/api/workers?status=1", auth=AUTH).json().get(node), "Flower seeing the worker"
        )

        jobs = [[str(BIN / "vllm-fleet"), "chat", CHAT_MODEL, prompt] for prompt in PROMPTS]
        jobs += [[str(BIN / "vllm-fleet"), "chat", CHAT_MODEL, "Stream a short answer", "--stream"]]
        jobs += [[str(BIN / "vllm-fleet"), "embed", EMBED_MODEL, "first text", "second text"]]

        def run(argv: list[str]) -> int:
            return subprocess.run(argv, env=producer_env, cwd=tmp, capture_output=True, timeout=60).returncode

        with ThreadPoolExecutor(3) as pool:
            codes = list(pool.map(run, jobs))
        if any(codes):
            raise SystemExit(f"some jobs failed: {codes}; see {tmp}")

        def all_done() -> bool:
            tasks = httpx.get(f"{flower}/api/tasks", auth=AUTH).json()
            return len(tasks) >= len(jobs) and all(t["state"] == "SUCCESS" for t in tasks.values())

        _wait(all_done, "Flower recording every task")

        args.out.parent.mkdir(parents=True, exist_ok=True)
        url = f"http://{AUTH[0]}:{AUTH[1]}@127.0.0.1:{flower_port}/{args.page}"
        shot = subprocess.run(
            [
                chromium,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--hide-scrollbars",
                f"--user-data-dir={tmp / 'chromium'}",
                "--virtual-time-budget=8000",
                "--window-size=1400,900",
                f"--screenshot={args.out.resolve()}",
                url,
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        if shot.returncode != 0 or not args.out.exists():
            raise SystemExit(f"chromium failed: {shot.stderr[-2000:]}")
        print(f"wrote {args.out}")
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=5)
        database.flushdb()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
