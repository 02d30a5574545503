"""Failure injection: error statuses, errors inside 200 streams, dropped connections and hangs."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from simulator.config import ServedModel, SimulatorConfig
from simulator.testing import SimulatorServer
from tests.conftest import wait_until

MODEL = "qwen3-6-27b"
OTHER_MODEL = "other"
TIMEOUT_S = 10.0
POLL_S = 0.005
WAIT_S = 15.0  # a bound for a loaded host, not a speed
CHAT_PATH = "/v1/chat/completions"


@pytest.fixture(scope="module")
def server() -> Iterator[SimulatorServer]:
    """One simulator: two generate models and an embedding model."""
    models = [
        ServedModel(name=MODEL),
        ServedModel(name=OTHER_MODEL),
        ServedModel(name="minilm", max_model_len=256, kind="embed"),
    ]
    with SimulatorServer(SimulatorConfig(models=models)) as running:
        yield running


@pytest.fixture
def sim(server: SimulatorServer) -> Iterator[SimulatorServer]:
    """The module's simulator, reset before and after each test."""
    server.reset()
    yield server
    server.reset()


@pytest.fixture
def http(sim: SimulatorServer) -> Iterator[httpx.Client]:
    """A client of the simulator."""
    with httpx.Client(base_url=sim.url, timeout=TIMEOUT_S) as client:
        yield client


def chat(model: str = MODEL, **extra: Any) -> dict[str, Any]:
    """A chat request body."""
    return {"model": model, "messages": [{"role": "user", "content": "one two three four five"}], **extra}


def settled(sim: SimulatorServer) -> dict[str, Any]:
    """The stats once nothing is in flight any more."""
    return wait_until(
        lambda: stats if not (stats := sim.stats())["in_flight"] else None,
        WAIT_S,
        "no request in flight",
        interval_s=POLL_S,
    )


def test_status_failure_uses_vllm_error_shape_and_count(sim: SimulatorServer, http: httpx.Client) -> None:
    """A status rule answers its status in vLLM's error shape for ``count`` requests, then lets them pass."""
    sim.configure(failures=[{"route": "chat", "status": 500, "count": 2}])
    for _ in range(2):
        response = http.post(CHAT_PATH, json=chat())
        assert response.status_code == 500
        assert response.json() == {
            "error": {
                "message": "Internal Server Error (injected by the simulator)",
                "type": "InternalServerError",
                "param": None,
                "code": 500,
            }
        }
    assert http.post(CHAT_PATH, json=chat()).status_code == 200
    assert sim.config()["failures"][0]["count"] == 0
    assert settled(sim)["failed"] == 2


def test_default_rule_is_a_busy_503_on_every_route(sim: SimulatorServer, http: httpx.Client) -> None:
    """The default rule is vLLM's busy 503; route "*" with count -1 hits every request."""
    sim.configure(failures=[{"count": -1, "message": "custom", "error_type": "CustomError"}])
    for method, path, body in (
        ("POST", CHAT_PATH, chat()),
        ("POST", "/v1/completions", {"model": MODEL, "prompt": "hi"}),
        ("POST", "/v1/embeddings", {"model": "minilm", "input": "hi"}),
        ("GET", "/v1/models", None),
    ):
        response = http.request(method, path, json=body)
        assert response.status_code == 503
        assert response.json()["error"] == {
            "message": "custom",
            "type": "CustomError",
            "param": None,
            "code": 503,
        }
    sim.configure(failures=[{}])
    busy = http.post(CHAT_PATH, json=chat()).json()["error"]
    assert busy["message"].startswith("The engine is currently busy")
    assert busy["type"] == "ServiceUnavailableError"


def test_rules_match_route_and_model(sim: SimulatorServer, http: httpx.Client) -> None:
    """A rule for one route and model leaves other routes and models alone; rules apply in order."""
    sim.configure(
        failures=[
            {"route": "completions", "model": OTHER_MODEL, "status": 502, "count": -1},
            {"route": "chat", "status": 504, "count": 1},
            {"route": "chat", "status": 500, "count": 1},
        ]
    )
    assert http.post("/v1/completions", json={"model": MODEL, "prompt": "hi"}).status_code == 200
    assert http.post("/v1/completions", json={"model": OTHER_MODEL, "prompt": "hi"}).status_code == 502
    assert [http.post(CHAT_PATH, json=chat()).status_code for _ in range(3)] == [504, 500, 200]


def test_error_frame_inside_a_200_stream(sim: SimulatorServer, http: httpx.Client) -> None:
    """After ``after_chunks`` chunks the stream carries an error frame, then [DONE], still with status 200."""
    sim.configure(failures=[{"route": "chat", "mode": "error_frame", "status": 500, "after_chunks": 3}])
    response = http.post(CHAT_PATH, json=chat(stream=True))
    assert response.status_code == 200
    frames = [block[len("data: ") :] for block in response.text.split("\n\n") if block]
    assert len(frames) == 5
    assert [json.loads(frame)["object"] for frame in frames[:3]] == ["chat.completion.chunk"] * 3
    assert frames[3].startswith('{"error": {"message": ')
    assert json.loads(frames[3])["error"]["code"] == 500
    assert frames[4] == "[DONE]"
    stats = settled(sim)
    assert (stats["failed"], stats["completed"]) == (1, 0)


def test_error_frame_on_a_plain_request_is_a_status(sim: SimulatorServer, http: httpx.Client) -> None:
    """A non-streamed request hit by an error_frame rule gets the error as its status."""
    sim.configure(failures=[{"mode": "error_frame", "status": 500}])
    assert http.post(CHAT_PATH, json=chat()).status_code == 500


def test_drop_mid_stream(sim: SimulatorServer, http: httpx.Client) -> None:
    """A drop rule sends ``after_chunks`` chunks, then closes the connection without [DONE]."""
    sim.configure(failures=[{"route": "chat", "mode": "drop", "after_chunks": 2}])
    lines: list[str] = []
    with (
        pytest.raises(httpx.RemoteProtocolError),
        http.stream("POST", CHAT_PATH, json=chat(stream=True)) as r,
    ):
        lines.extend(r.iter_lines())
    assert sum(line.startswith("data: ") for line in lines) == 2
    assert "data: [DONE]" not in lines
    assert settled(sim)["failed"] == 1
    assert http.post(CHAT_PATH, json=chat()).status_code == 200


def test_drop_plain_request_closes_without_answer(sim: SimulatorServer, http: httpx.Client) -> None:
    """A drop rule on a non-streamed request closes the connection before any answer."""
    sim.configure(failures=[{"route": "embeddings", "mode": "drop"}])
    with pytest.raises(httpx.RemoteProtocolError, match="without sending a response"):
        http.post("/v1/embeddings", json={"model": "minilm", "input": "hi"})
    assert settled(sim)["failed"] == 1
    assert http.post("/v1/embeddings", json={"model": "minilm", "input": "hi"}).status_code == 200


def test_hang_delays_the_answer(sim: SimulatorServer, http: httpx.Client) -> None:
    """A hang rule holds the request (in flight) for ``hang_s``, then it is answered normally."""
    sim.configure(failures=[{"mode": "hang", "hang_s": 0.3}])
    started = time.monotonic()
    response = http.post(CHAT_PATH, json=chat(stream=True))
    assert time.monotonic() - started >= 0.3
    assert response.text.endswith("data: [DONE]\n\n")
    assert settled(sim)["completed"] == 1


def test_hang_until_the_client_gives_up(sim: SimulatorServer, http: httpx.Client) -> None:
    """A client that times out on a hanging request leaves nothing in flight; it counts as aborted."""
    sim.configure(failures=[{"mode": "hang", "hang_s": 60}])
    with pytest.raises(httpx.ReadTimeout):
        http.post(CHAT_PATH, json=chat(), timeout=0.2)
    stats = settled(sim)
    assert (stats["aborted"], stats["max_in_flight_seen"]) == (1, 1)


def test_a_request_from_before_a_reset_is_not_counted_after_it(sim: SimulatorServer, http: httpx.Client) -> None:
    """Counters zeroed by a reset stay zero when a request issued before it ends later (no bleed between tests)."""
    sim.configure(failures=[{"mode": "hang", "hang_s": 60}])
    with pytest.raises(httpx.ReadTimeout):
        http.post(CHAT_PATH, json=chat(), timeout=0.2)
    sim.reset()
    stats = settled(sim)
    assert (stats["aborted"], stats["completed"], stats["in_flight"]) == (0, 0, 0)
    assert http.post(CHAT_PATH, json=chat(max_tokens=2)).status_code == 200
    assert settled(sim)["completed"] == 1
