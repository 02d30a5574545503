"""Operations on a real worker process: Prometheus metrics scraped from its port, structured logs with ids."""

from __future__ import annotations

import json
import socket
from typing import Any

import httpx

from tests.tasks.conftest import CHAT_MODEL, Fleet, WorkerProcess, wait_for

SECRET_PROMPT = "the launch code is swordfish-7781"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_worker_metrics_are_scraped_and_logs_carry_ids_without_payload(fleet: Fleet) -> None:
    from tasks import chat, version

    port = _free_port()
    settings = fleet.settings.model_copy(update={"metrics_port": port, "log_format": "json"})
    worker = WorkerProcess(settings, "metrics-worker", loglevel="INFO")
    try:
        wait_for(lambda: _scrape(port) is not None, what="the worker's metrics endpoint")
        # The in-process worker serves the same lanes, and the endpoint is up before the worker consumes: send
        # rounds of chats until the worker process has served (and counted) some of them.
        results: list[Any] = []

        def worker_counted_a_chat() -> bool:
            round_ = [
                chat.delay(model=CHAT_MODEL, messages=[{"role": "user", "content": SECRET_PROMPT}], max_tokens=8)
                for _ in range(8)
            ]
            for result in round_:
                assert result.get()["content"] == SECRET_PROMPT
            results.extend(round_)
            return 'operation="chat"' in (_scrape(port) or "")

        wait_for(worker_counted_a_chat, timeout_s=30, what="a chat counted by the worker process")
        version.delay(instance="sim-a").get()
        text = _scrape(port) or ""
    finally:
        worker.stop()
    lines = [line for line in text.splitlines() if line.startswith("vllm_fleet_requests_total{")]
    assert any('outcome="ok"' in line and 'operation="chat"' in line for line in lines), lines
    for metric in ("vllm_fleet_request_seconds_bucket", "vllm_fleet_tokens_total", "vllm_fleet_in_flight_requests"):
        assert metric in text
    assert SECRET_PROMPT not in text
    logs = worker.logs()
    records = [json.loads(line) for line in logs.splitlines() if line.startswith("{")]
    about_requests = [r for r in records if r.get("request_id", "-") != "-"]
    assert about_requests, logs[-2000:]
    ids = {result.id for result in results}
    served_here = [r for r in about_requests if r["request_id"] in ids]
    assert served_here, "the worker process served some of the chats"
    for record in served_here:
        assert record["lane"].startswith("llm.fleet.")
        assert record["correlation_id"] != "-"
    assert SECRET_PROMPT not in logs


def _scrape(port: int) -> str | None:
    try:
        response = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=1.0)
    except httpx.HTTPError:
        return None
    return response.text if response.status_code == 200 else None
