"""Where the simulator once differed from a real vLLM 0.32 server (issue 11), it now answers as the server does.

Each case is a request shape tried against a real 0.32 server: the status it got, and the error's shape. Where
``tests/data/vllm/`` has the recorded answer (``err_max_tokens_too_large``, ``err_context_too_long``,
``wake_up``, ``is_sleeping``), the exact text is compared; elsewhere the message is vLLM's own wording for that
check, with the ``(parameter=..., value=...)`` suffix and ``param`` its validation errors carry in 0.32.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from simulator.config import ServedModel, SimulatorConfig
from simulator.testing import SimulatorServer

DATA_DIR = Path(__file__).resolve().parents[1] / "data" / "vllm"
MODEL = "tiny-llama"
WINDOW = 2048
TIMEOUT_S = 10.0
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
NO_TOOL_PARSER = '"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser to be set'


@pytest.fixture(scope="module")
def server() -> Iterator[SimulatorServer]:
    """A server like the recording one: tiny-llama, a 2,048-token window, noise text up to max_tokens."""
    config = SimulatorConfig(
        models=[ServedModel(name=MODEL, max_model_len=WINDOW)], text_mode="lorem", output_tokens=4096
    )
    with SimulatorServer(config) as running:
        yield running


@pytest.fixture
def http(server: SimulatorServer) -> Iterator[httpx.Client]:
    """A client of the freshly reset simulator."""
    server.reset()
    with httpx.Client(base_url=server.url, timeout=TIMEOUT_S) as client:
        yield client
    server.reset()


def chat(content: str = "Hello", **extra: Any) -> dict[str, Any]:
    """A chat body for the test model."""
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], **extra}


def error_of(response: httpx.Response, status: int = 400) -> dict[str, Any]:
    """The ``error`` object of an error answer, after checking its status and vLLM's outer shape."""
    assert response.status_code == status, response.text
    body = response.json()
    assert list(body) == ["error"]
    assert list(body["error"]) == ["message", "type", "param", "code"]
    assert body["error"]["code"] == status
    error: dict[str, Any] = body["error"]
    return error


def sse_frames(response: httpx.Response) -> list[str]:
    """The data of each SSE frame of a streamed answer."""
    return [line[len("data: ") :] for line in response.text.split("\n\n") if line.startswith("data: ")]


def test_negative_temperature_is_refused(http: httpx.Client) -> None:
    """``temperature=-1``: 400 from the sampling-parameter check, naming the parameter."""
    error = error_of(http.post("/v1/chat/completions", json=chat(temperature=-1)))
    assert error["message"] == "temperature must be non-negative, got -1.0. (parameter=temperature, value=-1.0)"
    assert (error["type"], error["param"]) == ("BadRequestError", "temperature")


def test_empty_stop_string_is_refused(http: httpx.Client) -> None:
    """``stop=[""]`` (and ``stop=""``): 400."""
    for stop in ([""], ["done", ""], ""):
        error = error_of(http.post("/v1/chat/completions", json=chat(stop=stop)))
        assert (error["message"], error["type"]) == ("stop cannot contain an empty string.", "BadRequestError")
    assert http.post("/v1/chat/completions", json=chat(stop=["done"], max_tokens=2)).status_code == 200


def test_invalid_response_format_is_refused(http: httpx.Client) -> None:
    """An unknown ``response_format`` type, or ``json_schema`` without its schema: 400 (validation)."""
    unknown = error_of(http.post("/v1/chat/completions", json=chat(response_format={"type": "xml"})))
    assert unknown["type"] == "Bad Request"
    assert unknown["param"] == "body.response_format.type"
    assert "'input': 'xml'" in unknown["message"]
    missing = error_of(http.post("/v1/chat/completions", json=chat(response_format={"type": "json_schema"})))
    assert missing["param"] == "body.response_format"
    ok = http.post("/v1/chat/completions", json=chat(response_format={"type": "json_object"}, max_tokens=2))
    assert ok.status_code == 200


def test_empty_messages_are_refused(http: httpx.Client) -> None:
    """An empty ``messages`` list: 400, nothing generated."""
    error = error_of(http.post("/v1/chat/completions", json={"model": MODEL, "messages": []}))
    assert error["type"] == "BadRequestError"


def test_tools_on_a_server_without_a_tool_parser(server: SimulatorServer, http: httpx.Client) -> None:
    """``tool_parser=False`` (no ``--enable-auto-tool-choice``): tools with auto tool choice get 400; a named
    tool choice still works (vLLM serves it with structured outputs, without a parser)."""
    server.configure(tool_parser=False)
    for extra in ({}, {"tool_choice": "auto"}):
        body = chat("Weather in Paris?", tools=[WEATHER_TOOL], **extra)
        error = error_of(http.post("/v1/chat/completions", json=body))
        assert (error["message"], error["type"], error["param"]) == (NO_TOOL_PARSER, "BadRequestError", None)
        streamed = http.post("/v1/chat/completions", json={**body, "stream": True})
        assert error_of(streamed)["message"] == NO_TOOL_PARSER
    named = chat(tools=[WEATHER_TOOL], tool_choice={"type": "function", "function": {"name": "get_weather"}})
    answer = http.post("/v1/chat/completions", json={**named, "max_tokens": 64})
    assert answer.status_code == 200
    assert answer.json()["choices"][0]["message"]["tool_calls"]
    server.configure(tool_parser=True)
    assert http.post("/v1/chat/completions", json=chat(tools=[WEATHER_TOOL], max_tokens=64)).status_code == 200


def test_max_tokens_over_the_window_with_the_prompt_is_shortened(http: httpx.Client) -> None:
    """prompt + max_tokens over the window, the prompt itself fitting: 200, max_tokens cut to what fits."""
    prompt = " ".join(["word"] * 1600)
    answer = http.post("/v1/chat/completions", json=chat(prompt, max_tokens=2000, ignore_eos=True))
    assert answer.status_code == 200, answer.text
    body = answer.json()
    usage = body["usage"]
    assert usage["prompt_tokens"] + 2000 > WINDOW
    assert usage["prompt_tokens"] + usage["completion_tokens"] == WINDOW
    assert body["choices"][0]["finish_reason"] == "length"


def test_max_tokens_over_the_window_alone_is_refused_as_recorded(http: httpx.Client) -> None:
    """max_tokens above max_model_len by itself: the recorded 400 (``err_max_tokens_too_large``)."""
    answer = http.post("/v1/chat/completions", json=chat(max_tokens=999999))
    assert answer.json() == json.loads((DATA_DIR / "err_max_tokens_too_large.body").read_text())


def test_prompt_over_the_window_is_refused_as_recorded(http: httpx.Client) -> None:
    """A prompt longer than the window, whatever max_tokens: the recorded 400 (``err_context_too_long``)."""
    recorded = json.loads((DATA_DIR / "err_context_too_long.body").read_text())
    prompt = " ".join(["word"] * 2400)
    for extra in ({}, {"max_tokens": 10}):
        answer = http.post("/v1/chat/completions", json=chat(prompt, **extra))
        assert answer.json() == recorded


def test_waking_only_the_weights_leaves_the_server_sleeping(http: httpx.Client) -> None:
    """``/wake_up?tags=weights`` after a sleep: still sleeping (the KV cache is not back) until it wakes too."""
    assert http.post("/sleep?level=1").json() == json.loads((DATA_DIR / "sleep.body").read_text())
    assert http.post("/wake_up?tags=weights").json() == {"status": "awake", "tags": ["weights"]}
    assert http.get("/is_sleeping").json() == json.loads((DATA_DIR / "is_sleeping.body").read_text())
    assert http.post("/wake_up?tags=kv_cache").json() == {"status": "awake", "tags": ["kv_cache"]}
    assert http.get("/is_sleeping").json() == {"is_sleeping": False}


def test_too_many_top_logprobs(http: httpx.Client) -> None:
    """``top_logprobs=50`` (over the default max of 20): 400 plain; streamed, an error frame in a 200 stream."""
    body = chat(logprobs=True, top_logprobs=50, max_tokens=4)
    message = "Requested sample logprobs of 50, which is greater than max allowed: 20 (parameter=logprobs, value=50)"
    error = error_of(http.post("/v1/chat/completions", json=body))
    assert (error["message"], error["type"], error["param"]) == (message, "BadRequestError", "logprobs")
    streamed = http.post("/v1/chat/completions", json={**body, "stream": True})
    assert streamed.status_code == 200
    assert streamed.headers["content-type"].startswith("text/event-stream")
    frames = sse_frames(streamed)
    assert frames[-1] == "[DONE]"
    assert json.loads(frames[0]) == {"error": {**error}}
    assert len(frames) == 2
    fine = http.post("/v1/chat/completions", json=chat(logprobs=True, top_logprobs=20, max_tokens=2))
    assert fine.status_code == 200


def test_logprobs_when_asked(http: httpx.Client) -> None:
    """``logprobs`` with ``top_logprobs``: one entry per generated token, with that many alternatives; streamed,
    on each token's chunk."""
    body = chat(logprobs=True, top_logprobs=2, max_tokens=3)
    answer = http.post("/v1/chat/completions", json=body).json()["choices"][0]
    entries = answer["logprobs"]["content"]
    assert len(entries) == 3
    assert list(entries[0]) == ["token", "logprob", "bytes", "top_logprobs"]
    assert all(len(entry["top_logprobs"]) == 2 for entry in entries)
    assert "".join(entry["token"] for entry in entries) == answer["message"]["content"]
    frames = sse_frames(http.post("/v1/chat/completions", json={**body, "stream": True}))
    tokens = [json.loads(frame)["choices"][0] for frame in frames[1:-1] if json.loads(frame)["choices"]]
    assert [len(choice["logprobs"]["content"]) for choice in tokens if choice["delta"]] == [1, 1, 1]
    plain = http.post("/v1/chat/completions", json=chat(max_tokens=2)).json()["choices"][0]
    assert plain["logprobs"] is None
