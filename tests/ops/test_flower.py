"""Flower, for real, watching a live fleet: a worker process on the test Redis broker and the simulator.

A chat runs to the end while Flower listens; then, through Flower's HTTP API and pages with basic auth: the
worker and the finished task appear, the task's arguments are the redacted ``<envelope …>`` summary, and no
response of Flower carries the prompt, the signed token or any key; without credentials Flower answers 401;
``/metrics`` serves Flower's Prometheus metrics.

Every process here is configured like the compose services: the worker and the producer from
``Settings.to_env()``, Flower with the broker and result backend only (no keys).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from provider.settings import InstanceSettings, Settings, Timeouts
from simulator.config import ServedModel, SimulatorConfig
from simulator.testing import SimulatorServer
from tests.conftest import BROKER_DB, STATE_DB, wait_until
from tests.tasks.conftest import WorkerProcess, fleet_security, fleet_settings

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]

MODEL = "flower-watch-chat"  # a model (so lanes) no other test declares
INSTANCE = "flower-sim"
AUTH = ("ops", "flower-test-pass")
BIN = Path(sys.executable).parent
START_TIMEOUT_S = 20.0

# A producer in its own process, as an app would be: it prints the task id, the signed token it published and
# the answer, so the test knows exactly which secret strings must not show up in Flower.
PRODUCER = """
import json, sys
from celery.signals import before_task_publish
from tasks import chat

published = {}

@before_task_publish.connect
def _keep(body=None, **_):
    args = body[0] if isinstance(body, (list, tuple)) else body.get("args", ())
    published["token"] = args[0]["signed_token"]

result = chat.delay(model=sys.argv[1], messages=[{"role": "user", "content": sys.argv[2]}], max_tokens=64)
reply = result.get(timeout=60)
print(json.dumps({"id": result.id, "token": published["token"], "content": reply["content"]}))
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait(predicate: Any, what: str, timeout_s: float = START_TIMEOUT_S) -> None:
    wait_until(predicate, timeout_s, what, interval_s=0.1, ignore=(httpx.HTTPError, ValueError, KeyError))


def _secret_strings(settings: Settings) -> list[str]:
    """Every key as text, and each long line of their PEM bodies (a partial leak counts too)."""
    security = settings.security
    texts = [security.signing_key.get_secret_value()] if security.signing_key else []
    texts += [key.get_secret_value() for key in security.verify_keys.values()]
    texts += [key.get_secret_value() for key in security.encryption_keys.values()]
    lines = [line for text in texts for line in text.splitlines() if len(line) >= 16 and "-----" not in line]
    return [*texts, *lines]


@dataclass
class Watched:
    """Flower and the fleet it watches, after one chat finished."""

    base: str
    worker: str
    task_id: str
    prompt: str
    token: str
    secrets: list[str]

    def get(self, path: str, *, auth: tuple[str, str] | None = AUTH) -> httpx.Response:
        return httpx.get(self.base + path, auth=auth, timeout=10)


@pytest.fixture(scope="module")
def watched(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Watched]:
    """A simulator, a worker process, Flower with basic auth, and one chat that finished."""
    tmp = tmp_path_factory.mktemp("flower")
    prefix = f"vft-flower-{uuid.uuid4().hex[:8]}"
    config = SimulatorConfig(models=[ServedModel(name=MODEL, max_model_len=4096)], dev_mode=True)
    with SimulatorServer(config) as simulator:
        base_settings = fleet_settings(f"{redis_url}/{BROKER_DB}", redis_url, prefix, simulator.url, fleet_security())
        instance = InstanceSettings(name=INSTANCE, base_url=simulator.url, concurrency=4)
        # Roomier deadlines than the fault tests' (a loaded CI machine must not turn this into a timeout test).
        timeouts = Timeouts(chat_s=40, stream_s=40, embed_s=20, management_s=20)
        settings = base_settings.model_copy(update={"instances": {INSTANCE: instance}, "timeouts": timeouts})
        fleet_env = {**_clean_environ(), **settings.to_env(), "PYTHONUNBUFFERED": "1"}
        # Flower, as composed, gets the broker and the result backend, never a key.
        flower_env = {k: v for k, v in fleet_env.items() if not k.startswith("VLLM_FLEET_SECURITY")}
        port = _free_port()
        flower_log = (tmp / "flower.log").open("wb")
        flower = subprocess.Popen(
            [
                str(BIN / "celery"),
                "-A",
                "tasks.app",
                "flower",
                f"--port={port}",
                "--address=127.0.0.1",
                f"--basic-auth={AUTH[0]}:{AUTH[1]}",
            ],
            env=flower_env,
            cwd=tmp,
            stdout=flower_log,
            stderr=subprocess.STDOUT,
        )
        worker = WorkerProcess(settings, "flower-watch", concurrency=4)
        try:
            base = f"http://127.0.0.1:{port}"
            node = f"flower-watch@{socket.gethostname()}"

            def sees_worker() -> bool:  # through worker events: Flower is consuming them
                online = httpx.get(base + "/api/workers?status=1", auth=AUTH, timeout=5).json()
                return bool(online.get(node))

            _wait(sees_worker, "flower seeing the worker online")
            _wait(lambda: _registered(settings), "the worker registering its offering")

            def produce(prompt: str) -> dict[str, Any]:
                produced = subprocess.run(
                    [sys.executable, "-c", PRODUCER, MODEL, prompt],
                    env=fleet_env,
                    cwd=tmp,
                    capture_output=True,
                    text=True,
                    timeout=60,
                )
                assert produced.returncode == 0, produced.stderr[-3000:] + (tmp / "flower.log").read_text()[-2000:]
                answer: dict[str, Any] = json.loads(produced.stdout.strip().splitlines()[-1])
                return answer

            # The worker starts with task events off (the default); Flower switches them on in running workers
            # (its enable_events timer, every few seconds): tasks are visible to it from then on.
            def flower_sees_tasks() -> bool:
                warm_up = produce("warm-up")
                return warm_up["id"] in httpx.get(base + "/api/tasks", auth=AUTH, timeout=5).json()

            _wait(flower_sees_tasks, "flower switching task events on and seeing a task", timeout_s=40)
            prompt = f"flower must not show this prompt {uuid.uuid4().hex}"
            answer = produce(prompt)
            assert answer["content"] == prompt  # the simulator echoes: the answer is as secret as the prompt
            yield Watched(base, node, answer["id"], prompt, answer["token"], _secret_strings(settings))
        finally:
            worker.stop()
            flower.terminate()
            try:
                flower.wait(timeout=10)
            except subprocess.TimeoutExpired:
                flower.kill()
                flower.wait(timeout=10)
            flower_log.close()
            state = redis.Redis.from_url(f"{redis_url}/{STATE_DB}")
            for key in state.scan_iter(f"{prefix}*"):
                state.delete(key)


def _clean_environ() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("VLLM_FLEET_", "FLOWER_", "CELERY_"))}


def _registered(settings: Settings) -> bool:
    from provider.fleet.redis_keys import RedisKeys
    from provider.fleet.registry import OfferingRegistry

    client = redis.Redis.from_url(settings.redis_url)
    return any(o.model == MODEL for o in OfferingRegistry(client, RedisKeys(settings.key_prefix)).all())


def _finished(watched: Watched) -> dict[str, Any]:
    found: dict[str, Any] = {}

    def succeeded() -> bool:
        tasks = watched.get("/api/tasks").json()
        found.update(tasks.get(watched.task_id) or {})
        return found.get("state") == "SUCCESS"

    _wait(succeeded, "flower recording the finished task")
    return found


def test_worker_and_finished_task_appear_with_redacted_arguments(watched: Watched) -> None:
    # ?refresh=1 asks the workers over the broker with Flower's short timeout: a busy host can miss one round.
    replies: list[dict[str, Any]] = []

    def answered() -> bool:
        replies.append(watched.get("/api/workers?refresh=1").json())
        return watched.worker in replies[-1]

    _wait(answered, "flower's worker inspection answering")
    workers = replies[-1]
    assert watched.worker in workers
    assert "vllm.chat" in workers[watched.worker]["registered"]
    task = _finished(watched)
    assert task["name"] == "vllm.chat"
    assert task["worker"] == watched.worker
    assert task["args"].startswith("(<envelope op=chat ")
    assert f"request_id={watched.task_id} " in task["args"]
    assert f"model={MODEL}>" in task["args"]
    assert task["args"].endswith(">,)")
    assert task["kwargs"] == "{}"
    info = watched.get(f"/api/task/info/{watched.task_id}").json()
    assert info["args"] == task["args"]
    assert info["state"] == "SUCCESS"


def test_no_prompt_token_or_key_in_any_flower_response(watched: Watched) -> None:
    _finished(watched)
    paths = [
        "/api/workers?refresh=1",  # stats, conf, registered, active queues of every worker
        "/api/tasks",
        f"/api/task/info/{watched.task_id}",
        f"/api/task/result/{watched.task_id}",
        "/api/task/types",
        "/metrics",
        "/",
        "/tasks",
        f"/task/{watched.task_id}",
        f"/worker/{watched.worker}",
        "/tasks/datatable?draw=1&start=0&length=50&search[value]=&order[0][column]=0&order[0][dir]=desc",
    ]
    assert watched.token.count(".") == 2, "a compact JWS"
    forbidden = {"the prompt": watched.prompt, "the signed token": watched.token}
    forbidden["the token's signature"] = watched.token.rsplit(".", 1)[-1]
    forbidden |= {f"key material #{i}": secret for i, secret in enumerate(watched.secrets)}
    # Flower serves /metrics without authentication (for Prometheus): it must be as clean as the rest.
    for path, auth in [*((path, AUTH) for path in paths), ("/metrics", None)]:
        response = watched.get(path, auth=auth)
        assert response.status_code == 200, path
        for what, text in forbidden.items():
            assert text not in response.text, f"{what} shows in Flower's {path}"
    assert watched.task_id in watched.get("/api/tasks").text


def test_flower_refuses_requests_without_credentials(watched: Watched) -> None:
    for path in ("/api/workers", "/api/tasks", f"/api/task/info/{watched.task_id}", "/tasks", "/"):
        assert watched.get(path, auth=None).status_code == 401, path
        assert watched.get(path, auth=(AUTH[0], "wrong")).status_code == 401, path
    assert watched.get("/healthcheck", auth=None).status_code == 200


def test_metrics_serve_flower_prometheus_metrics(watched: Watched) -> None:
    _finished(watched)
    response = watched.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    assert "# TYPE flower_events_total counter" in response.text
    assert 'flower_events_total{task="vllm.chat",type="task-succeeded"' in response.text
    assert f'flower_worker_online{{worker="{watched.worker}"}} 1.0' in response.text
