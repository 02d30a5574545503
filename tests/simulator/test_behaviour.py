"""The simulator behaves like a loaded vLLM server: queueing, metrics, auth, sleep, cancellation, tools."""

from __future__ import annotations

import asyncio
import base64
import json
import math
import struct
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from simulator.config import ServedModel, SimulatorConfig
from simulator.testing import SimulatorServer
from tests.conftest import wait_until

MODEL = "qwen3-6-27b"
EMBED_MODEL = "minilm"
TIMEOUT_S = 10.0
POLL_S = 0.005
WAIT_S = 15.0  # a bound for a loaded host, not a speed: what "at once" means is asserted otherwise
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "enum": ["Paris", "Oslo"]},
                "days": {"type": "integer"},
            },
            "required": ["city", "days"],
        },
    },
}


@pytest.fixture(scope="module")
def server() -> Iterator[SimulatorServer]:
    """One simulator for the module: the default models plus a LoRA adapter."""
    models = [
        ServedModel(name=MODEL),
        ServedModel(name=EMBED_MODEL, max_model_len=256, kind="embed", matryoshka=True),
        ServedModel(name="my-lora", parent=MODEL),
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
    """A client of the simulator (its base URL set)."""
    with httpx.Client(base_url=sim.url, timeout=TIMEOUT_S) as client:
        yield client


def chat(content: str = "Hello world", **extra: Any) -> dict[str, Any]:
    """A chat request body."""
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], **extra}


def wait_for(condition: Callable[[], bool], timeout_s: float = WAIT_S) -> None:
    """Poll ``condition`` (every few milliseconds: the simulator's states are short) until it holds."""
    wait_until(condition, timeout_s, "the simulator's state", interval_s=POLL_S)


def data_frames(text: str) -> list[Any]:
    """The payloads of an SSE body's data frames (``[DONE]`` kept as a string)."""
    payloads = []
    for block in text.split("\n\n"):
        if block.startswith("data: "):
            data = block[len("data: ") :]
            payloads.append(data if data == "[DONE]" else json.loads(data))
    return payloads


def gauge(metrics: str, name: str, model: str = MODEL) -> float:
    """One sample of ``name`` for ``model`` from Prometheus text."""
    prefix = f'{name}{{engine="0",model_name="{model}"}} '
    for line in metrics.splitlines():
        if line.startswith(prefix):
            return float(line[len(prefix) :])
    raise AssertionError(f"{name} not found")


def run_streams(url: str, bodies: list[dict[str, Any]]) -> list[list[Any]]:
    """Run streamed chat requests concurrently; the data frames of each."""

    async def one(client: httpx.AsyncClient, body: dict[str, Any]) -> list[Any]:
        async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
            return data_frames((await response.aread()).decode())

    async def main() -> list[list[Any]]:
        limits = httpx.Limits(max_connections=len(bodies))
        async with httpx.AsyncClient(limits=limits, timeout=TIMEOUT_S) as client:
            return list(await asyncio.gather(*(one(client, body) for body in bodies)))

    return asyncio.run(main())


def in_thread(target: Callable[[], Any]) -> tuple[threading.Thread, list[Any]]:
    """Run ``target`` in a thread; its result lands in the returned list."""
    results: list[Any] = []
    thread = threading.Thread(target=lambda: results.append(target()), daemon=True)
    thread.start()
    return thread, results


def test_metrics_and_load_move_with_load(sim: SimulatorServer, http: httpx.Client) -> None:
    """Running, waiting and KV-cache gauges and /load rise under load and fall back to zero."""
    sim.configure(max_running=2, itl_s=0.02)
    bodies = [chat(max_tokens=15, ignore_eos=True, stream=True)] * 5
    thread, results = in_thread(lambda: run_streams(sim.url, bodies))

    def loaded() -> bool:
        metrics = http.get("/metrics").text
        return (
            gauge(metrics, "vllm:num_requests_running") == 2
            and gauge(metrics, "vllm:num_requests_waiting") == 3
            and gauge(metrics, "vllm:kv_cache_usage_perc") > 0
        )

    wait_for(loaded)
    assert http.get("/load").json() == {"server_load": 5}
    thread.join(TIMEOUT_S)
    assert all(frames[-1] == "[DONE]" for frames in results[0])
    metrics = http.get("/metrics").text
    assert gauge(metrics, "vllm:num_requests_running") == 0
    assert gauge(metrics, "vllm:num_requests_waiting") == 0
    assert gauge(metrics, "vllm:kv_cache_usage_perc") == 0
    assert gauge(metrics, "vllm:generation_tokens_total") == 5 * 15
    assert gauge(metrics, "vllm:time_to_first_token_seconds_count") == 5
    assert 'vllm:request_success_total{engine="0",finished_reason="length",model_name="qwen3-6-27b"} 5.0' in metrics
    assert http.get("/load").json() == {"server_load": 0}
    stats = sim.stats()
    assert (stats["completed"], stats["max_running_seen"], stats["in_flight"]) == (5, 2, 0)


def test_many_concurrent_streams_are_counted_exactly(sim: SimulatorServer) -> None:
    """Hundreds of streams through a small running pool: every one completes, no count drifts."""
    sim.configure(max_running=20, itl_s=0.005)
    results = run_streams(sim.url, [chat(max_tokens=5, ignore_eos=True, stream=True)] * 200)
    assert all(len(frames) == 7 and frames[-1] == "[DONE]" for frames in results)
    stats = sim.stats()
    assert stats["completed"] == 200
    assert stats["max_running_seen"] == 20
    assert stats["max_in_flight_seen"] > 20
    assert (stats["in_flight"], stats["running"], stats["waiting"], stats["aborted"]) == (0, 0, 0, 0)


def test_full_queue_answers_503(sim: SimulatorServer, http: httpx.Client) -> None:
    """Beyond max_queued waiting requests the server answers 503 busy in vLLM's error shape."""
    sim.configure(max_running=1, max_queued=1, itl_s=0.01)
    body = chat(max_tokens=500, ignore_eos=True, stream=True)
    url = "/v1/chat/completions"
    with http.stream("POST", url, json=body, timeout=TIMEOUT_S), http.stream("POST", url, json=body):
        wait_for(lambda: sim.stats()["waiting"] == 1)
        response = http.post(url, json=chat())
        assert response.status_code == 503
        error = response.json()["error"]
        assert error["message"].startswith("The engine is currently busy")
        assert (error["type"], error["param"], error["code"]) == ("ServiceUnavailableError", None, 503)
    wait_for(lambda: sim.stats()["in_flight"] == 0)
    stats = sim.stats()
    assert (stats["rejected"], stats["aborted"]) == (1, 2)


def test_api_key_guards_v1_only(sim: SimulatorServer, http: httpx.Client) -> None:
    """With an api key, /v1 needs the Bearer key (401 otherwise); other routes and /_sim stay open."""
    sim.configure(api_key="sekret")
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "sekret"}):
        response = http.get("/v1/models", headers=headers)
        assert (response.status_code, response.json()) == (401, {"error": "Unauthorized"})
        assert "vary" not in response.headers
    assert http.get("/v1/models", headers={"Authorization": "Bearer sekret"}).status_code == 200
    assert sim.stats()["last_request_headers"]["authorization"] == "Bearer sekret"
    response = http.post("/v1/chat/completions", json=chat())
    assert response.status_code == 401
    for path in ("/health", "/version", "/metrics", "/load", "/is_sleeping", "/_sim/stats"):
        assert http.get(path).status_code == 200
    assert http.post("/tokenize", json={"prompt": "hi"}).status_code == 200


def test_dev_routes_exist_only_in_dev_mode(sim: SimulatorServer, http: httpx.Client) -> None:
    """Without dev mode the management routes answer FastAPI's 404."""
    sim.configure(dev_mode=False)
    for method, path in (
        ("POST", "/sleep"),
        ("POST", "/wake_up"),
        ("GET", "/is_sleeping"),
        ("POST", "/reset_prefix_cache"),
        ("POST", "/reset_mm_cache"),
    ):
        response = http.request(method, path)
        assert (response.status_code, response.json()) == (404, {"detail": "Not Found"})


def test_legacy_dev_routes_answer_empty(sim: SimulatorServer, http: httpx.Client) -> None:
    """Servers before 0.32 answered the management routes with an empty 200."""
    sim.configure(legacy_dev_routes=True)
    for path in ("/sleep?level=2", "/wake_up", "/reset_prefix_cache?device=cuda", "/reset_mm_cache"):
        response = http.post(path)
        assert (response.status_code, response.content) == (200, b"")
    assert http.get("/is_sleeping").json() == {"is_sleeping": False}


def test_sleep_queues_requests_until_wake_up(sim: SimulatorServer, http: httpx.Client) -> None:
    """A request arriving while asleep waits (counted as waiting) and is answered after wake_up."""
    assert http.post("/sleep?level=1").json() == {"status": "sleeping", "level": 1}
    thread, results = in_thread(lambda: httpx.post(f"{sim.url}/v1/chat/completions", json=chat(), timeout=TIMEOUT_S))
    wait_for(lambda: sim.stats()["waiting"] == 1)
    assert gauge(http.get("/metrics").text, "vllm:num_requests_waiting") == 1
    assert not results
    http.post("/wake_up?tags=weights")
    assert http.get("/is_sleeping").json() == {"is_sleeping": True}
    http.post("/wake_up?tags=kv_cache")
    thread.join(TIMEOUT_S)
    assert results[0].status_code == 200
    assert results[0].json()["choices"][0]["message"]["content"] == "Hello world"


def test_sleep_abort_ends_plain_and_queued_requests(sim: SimulatorServer, http: httpx.Client) -> None:
    """mode=abort ends a running plain request and a queued one with finish_reason abort."""
    sim.configure(max_running=1, itl_s=0.01)
    url = "/v1/chat/completions"
    body = chat(max_tokens=1000, ignore_eos=True)
    first, first_result = in_thread(lambda: httpx.post(sim.url + url, json=body, timeout=TIMEOUT_S))
    wait_for(lambda: sim.stats()["running"] == 1)
    second, second_result = in_thread(
        lambda: httpx.post(sim.url + url, json=dict(body, stream=True), timeout=TIMEOUT_S)
    )
    wait_for(lambda: sim.stats()["waiting"] == 1)
    http.post("/sleep?mode=abort")
    first.join(TIMEOUT_S)
    second.join(TIMEOUT_S)
    answer = first_result[0].json()
    assert answer["choices"][0]["finish_reason"] == "abort"
    assert 0 < answer["usage"]["completion_tokens"] < 1000
    frames = data_frames(second_result[0].text)
    assert [frame["choices"][0]["finish_reason"] for frame in frames[:-1]] == [None, "abort"]
    assert frames[-1] == "[DONE]"
    wait_for(lambda: sim.stats()["in_flight"] == 0)  # a stream's request ends just after its last frame


KEEP_WINDOW_S = 0.2


def test_sleep_keep_pauses_running_streams(sim: SimulatorServer, http: httpx.Client) -> None:
    """mode=keep holds a running stream without ending it; after wake_up it runs to its end."""
    sim.configure(itl_s=0.01)
    arrivals: list[float] = []

    def read() -> list[Any]:
        body = chat(max_tokens=30, ignore_eos=True, stream=True)
        with httpx.stream("POST", f"{sim.url}/v1/chat/completions", json=body, timeout=TIMEOUT_S) as response:
            lines = []
            for line in response.iter_lines():
                arrivals.append(time.monotonic())
                lines.append(line)
        return data_frames("\n".join(lines) + "\n")

    thread, results = in_thread(read)
    wait_for(lambda: len(arrivals) > 6)
    http.post("/sleep?mode=keep")
    asleep_at = len(arrivals)
    time.sleep(KEEP_WINDOW_S)  # the behaviour under test: a window with the server asleep
    assert sim.stats()["running"] == 1
    # 20+ frames' worth of time: none generated while asleep (one already on its way may still land)
    assert len(arrivals) <= asleep_at + 1
    http.post("/wake_up")
    thread.join(TIMEOUT_S)
    frames = results[0]
    assert frames[-2]["choices"][0]["finish_reason"] == "length"
    assert len(arrivals) > asleep_at + 1  # and it ran on to its end after wake_up


def test_sleep_wait_drains_running_requests(sim: SimulatorServer, http: httpx.Client) -> None:
    """mode=wait answers once the running requests have finished."""
    sim.configure(itl_s=0.01)
    body = chat(max_tokens=20, ignore_eos=True)
    thread, results = in_thread(lambda: httpx.post(f"{sim.url}/v1/chat/completions", json=body, timeout=TIMEOUT_S))
    wait_for(lambda: sim.stats()["running"] == 1)
    assert http.post("/sleep?mode=wait", timeout=TIMEOUT_S).status_code == 200
    assert sim.stats()["running"] == 0
    thread.join(TIMEOUT_S)
    assert results[0].json()["choices"][0]["finish_reason"] == "length"


def test_stream_disconnect_aborts_generation(sim: SimulatorServer, http: httpx.Client) -> None:
    """Closing a stream mid-way stops generation at once and counts the request as aborted."""
    sim.configure(itl_s=0.01)
    body = chat(max_tokens=1000, ignore_eos=True, stream=True)
    with http.stream("POST", "/v1/chat/completions", json=body) as response:
        for index, _ in enumerate(response.iter_lines()):
            if index == 8:
                break
    wait_for(lambda: sim.stats()["in_flight"] == 0)
    stats = sim.stats()
    assert (stats["aborted"], stats["completed"], stats["running"]) == (1, 0, 0)
    generated = gauge(http.get("/metrics").text, "vllm:generation_tokens_total")
    time.sleep(0.05)
    assert generated == gauge(http.get("/metrics").text, "vllm:generation_tokens_total")
    assert generated < 50


def test_plain_request_disconnect_aborts_generation(sim: SimulatorServer, http: httpx.Client) -> None:
    """A client that gives up on a non-streamed request aborts it too."""
    sim.configure(itl_s=0.01)
    with pytest.raises(httpx.ReadTimeout):
        http.post("/v1/chat/completions", json=chat(max_tokens=1000, ignore_eos=True), timeout=0.1)
    wait_for(lambda: sim.stats()["in_flight"] == 0)
    assert sim.stats()["aborted"] == 1


def test_keepalive_comments_while_idle(sim: SimulatorServer, http: httpx.Client) -> None:
    """With keepalive_s set, a stream waiting for its first token sends keep-alive comments."""
    sim.configure(keepalive_s=0.03, ttft_s=0.2)
    response = http.post("/v1/chat/completions", json=chat(stream=True), timeout=TIMEOUT_S)
    head, _, _ = response.text.partition("data: ")
    assert head.count(": keep-alive\n\n") >= 3
    assert data_frames(response.text)[-1] == "[DONE]"
    sim.configure(keepalive_s=None)
    response = http.post("/v1/chat/completions", json=chat(stream=True), timeout=TIMEOUT_S)
    assert response.text.startswith("data: ")


def test_request_id_header_and_body(sim: SimulatorServer, http: httpx.Client) -> None:
    """X-Request-Id names the answer, before the body's request_id; both get vLLM's prefixes."""
    url = "/v1/chat/completions"
    assert http.post(url, json=chat(), headers={"X-Request-Id": "abc"}).json()["id"] == "chatcmpl-abc"
    assert http.post(url, json=chat(request_id="xyz")).json()["id"] == "chatcmpl-xyz"
    response = http.post(url, json=chat(request_id="xyz"), headers={"X-Request-Id": "abc"})
    assert response.json()["id"] == "chatcmpl-abc"
    frames = data_frames(http.post(url, json=chat(stream=True), headers={"X-Request-Id": "s1"}).text)
    assert {frame["id"] for frame in frames[:-1]} == {"chatcmpl-s1"}
    body = {"model": MODEL, "prompt": "hi", "request_id": "c1"}
    assert http.post("/v1/completions", json=body).json()["id"] == "cmpl-c1"


def test_latency_settings_are_applied(sim: SimulatorServer, http: httpx.Client) -> None:
    """ttft_s passes before the first token and itl_s between tokens."""
    sim.configure(ttft_s=0.1, itl_s=0.02)
    started = time.monotonic()
    http.post("/v1/chat/completions", json=chat(max_tokens=6, ignore_eos=True), timeout=TIMEOUT_S)
    assert time.monotonic() - started >= 0.2  # ttft + 5 * itl at least (a loaded host only adds to it)


def test_echo_and_lorem_texts(sim: SimulatorServer, http: httpx.Client) -> None:
    """Echo answers with the last user message; lorem with output_tokens tokens; max_tokens cuts both."""
    url = "/v1/chat/completions"
    messages = [
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": "Tell me, briefly."},
    ]
    answer = http.post(url, json={"model": MODEL, "messages": messages}).json()
    assert answer["choices"][0]["message"]["content"] == "Tell me, briefly."
    assert (answer["choices"][0]["finish_reason"], answer["usage"]["completion_tokens"]) == ("stop", 6)
    cut = http.post(url, json=chat("one two three four", max_tokens=2)).json()
    assert cut["choices"][0]["message"]["content"] == "one two"
    assert (cut["choices"][0]["finish_reason"], cut["usage"]["completion_tokens"]) == ("length", 2)
    sim.configure(text_mode="lorem", output_tokens=12)
    first, second = (http.post(url, json=chat("seed")).json() for _ in range(2))
    assert first["choices"][0]["message"]["content"] == second["choices"][0]["message"]["content"]
    assert len(first["choices"][0]["message"]["content"].split()) == 11
    assert first["usage"]["completion_tokens"] == 12
    other = http.post(url, json=chat("another seed")).json()
    assert other["choices"][0]["message"]["content"] != first["choices"][0]["message"]["content"]
    streamed = data_frames(http.post(url, json=chat("seed", stream=True)).text)
    text = "".join(frame["choices"][0]["delta"].get("content") or "" for frame in streamed[:-1])
    assert text == first["choices"][0]["message"]["content"]


def test_tool_calls(sim: SimulatorServer, http: httpx.Client) -> None:
    """Named tool_choice: content "" and stop; auto: content null and tool_calls; none: plain text."""
    url = "/v1/chat/completions"
    named = {"type": "function", "function": {"name": "get_weather"}}
    answer = http.post(url, json=chat(tools=[WEATHER_TOOL], tool_choice=named)).json()["choices"][0]
    call = answer["message"]["tool_calls"][0]
    assert (answer["message"]["content"], answer["finish_reason"]) == ("", "stop")
    assert call["id"].startswith("chatcmpl-tool-")
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Paris", "days": 1}'}
    auto = http.post(url, json=chat(tools=[WEATHER_TOOL], tool_choice="auto")).json()["choices"][0]
    assert (auto["message"]["content"], auto["finish_reason"]) == (None, "tool_calls")
    default = http.post(url, json=chat(tools=[WEATHER_TOOL])).json()["choices"][0]
    assert default["finish_reason"] == "tool_calls"
    plain = http.post(url, json=chat(tools=[WEATHER_TOOL], tool_choice="none")).json()["choices"][0]
    assert (plain["message"]["content"], "tool_calls" in plain["message"]) == ("Hello world", False)
    frames = data_frames(http.post(url, json=chat(tools=[WEATHER_TOOL], stream=True)).text)
    calls = [frame["choices"][0]["delta"]["tool_calls"][0] for frame in frames[1:-2]]
    assert calls[0]["function"] == {"name": "get_weather"}
    assert "".join(part["function"]["arguments"] for part in calls[1:]) == '{"city": "Paris", "days": 1}'
    assert frames[-2]["choices"][0]["finish_reason"] == "tool_calls"
    missing = {"type": "function", "function": {"name": "nope"}}
    assert http.post(url, json=chat(tools=[WEATHER_TOOL], tool_choice=missing)).status_code == 400


def test_reasoning_styles_and_fields(sim: SimulatorServer, http: httpx.Client) -> None:
    """Thinking shows as <think> tags in content, or in the reasoning field(s) a server generation uses."""
    url = "/v1/chat/completions"
    thinking: dict[str, Any] = {"chat_template_kwargs": {"enable_thinking": True}}
    plain = http.post(url, json=chat(**thinking)).json()["choices"][0]["message"]
    assert (plain["content"], plain["reasoning"]) == ("Hello world", None)
    sim.configure(models=[{"name": MODEL, "reasoning": "tags"}], reasoning_tokens=3)
    tagged = http.post(url, json=chat(**thinking)).json()["choices"][0]["message"]
    assert tagged["content"].startswith("<think>\n")
    assert tagged["content"].endswith("</think>\n\nHello world")
    assert http.post(url, json=chat()).json()["choices"][0]["message"]["content"] == "Hello world"
    sim.configure(models=[{"name": MODEL, "reasoning": "server"}], reasoning_field="reasoning_content")
    answer = http.post(url, json=chat(**thinking)).json()
    message = answer["choices"][0]["message"]
    assert list(message)[-1] == "reasoning_content"
    assert len(message["reasoning_content"].split()) == 3
    assert answer["usage"]["completion_tokens_details"] == {"reasoning_tokens": 3}
    sim.configure(reasoning_field="both")
    frames = data_frames(http.post(url, json=chat(stream=True, **thinking)).text)
    delta = frames[1]["choices"][0]["delta"]
    assert list(delta) == ["reasoning_content", "reasoning"]
    assert delta["reasoning"] == delta["reasoning_content"]
    cut = http.post(url, json=chat(max_tokens=2, **thinking)).json()["choices"][0]
    assert (cut["message"]["content"], cut["finish_reason"]) == (None, "length")


def test_lora_adapter_is_listed_and_served(sim: SimulatorServer, http: httpx.Client) -> None:
    """A LoRA adapter is listed with its parent and a null max_model_len, and answers under its own name."""
    listed = {entry["id"]: entry for entry in http.get("/v1/models").json()["data"]}
    assert (listed["my-lora"]["parent"], listed["my-lora"]["max_model_len"]) == (MODEL, None)
    assert (listed[MODEL]["parent"], listed[MODEL]["max_model_len"]) == (None, 32768)
    answer = http.post("/v1/chat/completions", json=dict(chat(), model="my-lora")).json()
    assert answer["model"] == "my-lora"
    metrics = http.get("/metrics").text
    assert 'model_name="my-lora"' not in metrics


def test_embeddings_are_deterministic_unit_vectors(sim: SimulatorServer, http: httpx.Client) -> None:
    """Same text, same vector; unit length; base64 is the same float32 values; dimensions truncate."""
    url = "/v1/embeddings"
    first = http.post(url, json={"model": EMBED_MODEL, "input": ["hello", "world"]}).json()
    again = http.post(url, json={"model": EMBED_MODEL, "input": "hello"}).json()
    vector = first["data"][0]["embedding"]
    assert vector == again["data"][0]["embedding"] != first["data"][1]["embedding"]
    assert len(vector) == 384
    assert math.isclose(math.fsum(v * v for v in vector), 1.0, rel_tol=1e-5)
    encoded = http.post(url, json={"model": EMBED_MODEL, "input": "hello", "encoding_format": "base64"}).json()
    raw = base64.b64decode(encoded["data"][0]["embedding"])
    assert list(struct.unpack(f"<{len(raw) // 4}f", raw)) == vector
    short = http.post(url, json={"model": EMBED_MODEL, "input": "hello", "dimensions": 8}).json()
    assert len(short["data"][0]["embedding"]) == 8
    assert http.post(url, json={"model": EMBED_MODEL, "input": "hi", "dimensions": 999}).status_code == 400
    too_long = http.post(url, json={"model": EMBED_MODEL, "input": "word " * 300})
    assert too_long.status_code == 400
    assert too_long.json()["error"]["param"] == "input_tokens"
    assert http.post(url, json={"input": "default model"}).json()["model"] == EMBED_MODEL


def test_tokenize_matches_usage_and_round_trips(sim: SimulatorServer, http: httpx.Client) -> None:
    """/tokenize of messages counts what chat usage reports; detokenize inverts tokenize."""
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    counted = http.post("/tokenize", json={"model": MODEL, "messages": messages}).json()
    answer = http.post("/v1/chat/completions", json={"model": MODEL, "messages": messages}).json()
    assert counted["count"] == answer["usage"]["prompt_tokens"] == len(counted["tokens"])
    text = "Hello, world! It's 42."
    encoded = http.post("/tokenize", json={"prompt": text, "return_token_strs": True}).json()
    assert "".join(encoded["token_strs"]) == text
    decoded = http.post("/detokenize", json={"model": MODEL, "tokens": encoded["tokens"]}).json()
    assert decoded == {"prompt": text}
    pooled = http.post("/tokenize", json={"model": EMBED_MODEL, "prompt": text}).json()
    assert (pooled["count"], pooled["max_model_len"]) == (encoded["count"], 256)
    unknown = http.post("/tokenize", json={"model": "nope", "prompt": text})
    assert (unknown.status_code, unknown.json()["error"]["type"]) == (404, "NotFoundError")


def test_completions_with_several_prompts(sim: SimulatorServer, http: httpx.Client) -> None:
    """A list of prompts gets one choice per prompt, streamed choice after choice."""
    body = {"model": MODEL, "prompt": ["one two", "three"], "max_tokens": 5}
    answer = http.post("/v1/completions", json=body).json()
    assert [choice["text"] for choice in answer["choices"]] == ["one two", "three"]
    assert answer["usage"] == {
        "prompt_tokens": 3,
        "total_tokens": 8,
        "completion_tokens": 5,
        "prompt_tokens_details": None,
        "completion_tokens_details": None,
    }
    options = {"include_usage": True, "continuous_usage_stats": True}
    frames = data_frames(http.post("/v1/completions", json=dict(body, stream=True, stream_options=options)).text)
    assert [frame["choices"][0]["index"] for frame in frames[:-2]] == [0, 0, 0, 1, 1]
    assert [frame["usage"]["completion_tokens"] for frame in frames[:-1]] == [1, 2, 3, 4, 5, 5]
    assert frames[-2]["choices"] == []


def test_validation_and_routing_errors(sim: SimulatorServer, http: httpx.Client) -> None:
    """Wrong content type, bad JSON, missing fields, context overflow, unknown routes: vLLM's answers."""
    url = "/v1/chat/completions"
    wrong_type = http.post(url, content=json.dumps(chat()), headers={"content-type": "text/plain"})
    assert wrong_type.status_code == 400
    assert "Unsupported Media Type" in wrong_type.json()["error"]["message"]
    bad_json = http.post(url, content="{not json", headers={"content-type": "application/json"})
    assert bad_json.status_code == 400
    assert "json_invalid" in bad_json.json()["error"]["message"]
    missing = http.post(url, json={"model": MODEL}).json()["error"]
    assert (missing["param"], missing["type"], missing["code"]) == ("body.messages", "Bad Request", 400)
    assert http.post(url, json={"messages": [{"role": "user", "content": "hi"}]}).json()["model"] == MODEL
    options = http.post(url, json=chat(stream_options={"include_usage": True})).json()["error"]
    assert "Stream options can only be defined when `stream=True`." in options["message"]
    assert options["param"] == "body"
    sim.configure(models=[{"name": MODEL, "max_model_len": 20}])
    shortened = http.post(url, json=chat("a b c d e f g h", max_tokens=10, ignore_eos=True)).json()
    assert shortened["usage"]["total_tokens"] == 20, "max_tokens cut to the room the prompt leaves, as vLLM 0.32"
    overflow = http.post(url, json=chat(" ".join(["word"] * 30), max_tokens=10)).json()["error"]
    assert "even without any output tokens" in overflow["message"]
    assert overflow["param"] == "input_tokens"
    zero = http.post(url, json=chat(max_tokens=0)).json()["error"]
    assert zero["param"] == "max_tokens"
    assert http.get("/v2/nothing").json() == {"detail": "Not Found"}
    wrong_method = http.get(url)
    assert (wrong_method.status_code, wrong_method.json()) == (405, {"detail": "Method Not Allowed"})


def test_dead_engine_fails_health(sim: SimulatorServer, http: httpx.Client) -> None:
    """A dead engine answers /health and /ping with an empty 503."""
    sim.configure(dead=True)
    for method in ("GET", "POST"):
        response = http.request(method, "/ping")
        assert (response.status_code, response.content) == (503, b"")
    assert http.get("/health").status_code == 503


def test_control_routes(sim: SimulatorServer, http: httpx.Client) -> None:
    """/_sim/config patches and rejects bad patches; stats keep the last chat body; reset restores."""
    assert sim.configure(output_tokens=3)["output_tokens"] == 3
    assert http.post("/_sim/config", json={"max_running": 0}).status_code == 400
    assert http.post("/_sim/config", json={"nonsense": 1}).status_code == 400
    body = chat(chat_template_kwargs={"enable_thinking": False}, extra_field=[1])
    http.post("/v1/chat/completions", json=body)
    stats = sim.stats()
    assert stats["last_chat_body"] == body
    assert stats["requests"]["chat"] == 1
    sim.reset()
    assert sim.config()["output_tokens"] == 16
    assert sim.stats()["requests"] == {}
