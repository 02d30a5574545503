"""The simulator answers every recorded request with the shape of a real vLLM 0.32 server's answer.

Each case replays a request from ``tests/data/vllm/requests.txt`` (and ``requests/*.json``) against a
simulator set up like the recording server, then compares status, content type, header kinds, JSON keys
(recursively, in order), JSON types, and for streams the SSE framing and the sequence of chunk kinds.
Texts and numbers differ by design; shapes must not.
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
from tests.conftest import wait_until

DATA_DIR = Path(__file__).resolve().parents[1] / "data" / "vllm"
API_KEY = "test-key-not-secret"
HELLO = [{"role": "user", "content": "Hello"}]
CHAT = {"model": "tiny-llama", "messages": HELLO}
LONG_PROMPT_WORDS = 2400
ABORT_AFTER_FRAMES = 10
CLIENT_TIMEOUT_S = 10.0

SERVER_CONFIGS = {
    # The first recording server: a random-weight model that never stops before max_tokens.
    "chat": SimulatorConfig(
        models=[ServedModel(name="tiny-llama", max_model_len=2048)], text_mode="lorem", output_tokens=4096
    ),
    "embed": SimulatorConfig(models=[ServedModel(name="minilm", max_model_len=256, kind="embed")]),
    # The second: a reasoning parser, a tool-call parser and an api key.
    "reasoning": SimulatorConfig(
        models=[ServedModel(name="tiny-llama", max_model_len=2048, reasoning="server")], api_key=API_KEY
    ),
}

CASES: list[tuple[str, str, str, str, dict[str, Any] | None, dict[str, str]]] = [
    ("models", "chat", "GET", "/v1/models", None, {}),
    ("health", "chat", "GET", "/health", None, {}),
    ("version", "chat", "GET", "/version", None, {}),
    ("load", "chat", "GET", "/load", None, {}),
    ("chat", "chat", "POST", "/v1/chat/completions", {**CHAT, "max_tokens": 8, "temperature": 0}, {}),
    (
        "chat_stream_usage",
        "chat",
        "POST",
        "/v1/chat/completions",
        {**CHAT, "max_tokens": 6, "stream": True, "stream_options": {"include_usage": True}},
        {},
    ),
    (
        "chat_stream_continuous_usage",
        "chat",
        "POST",
        "/v1/chat/completions",
        {
            **CHAT,
            "max_tokens": 3,
            "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True},
        },
        {},
    ),
    (
        "chat_thinking_kwargs",
        "chat",
        "POST",
        "/v1/chat/completions",
        {**CHAT, "max_tokens": 4, "chat_template_kwargs": {"enable_thinking": True}},
        {},
    ),
    (
        "completions",
        "chat",
        "POST",
        "/v1/completions",
        {"model": "tiny-llama", "prompt": "Hello", "max_tokens": 5},
        {},
    ),
    (
        "completions_stream",
        "chat",
        "POST",
        "/v1/completions",
        {"model": "tiny-llama", "prompt": "Hello", "max_tokens": 3, "stream": True},
        {},
    ),
    ("err_unknown_model", "chat", "POST", "/v1/chat/completions", {**CHAT, "model": "nope"}, {}),
    (
        "err_validation",
        "chat",
        "POST",
        "/v1/chat/completions",
        {"model": "tiny-llama", "messages": "not a list"},
        {},
    ),
    (
        "err_context_too_long",
        "chat",
        "POST",
        "/v1/chat/completions",
        {"model": "tiny-llama", "messages": [{"role": "user", "content": "word " * LONG_PROMPT_WORDS}]},
        {},
    ),
    ("err_max_tokens_too_large", "chat", "POST", "/v1/chat/completions", {**CHAT, "max_tokens": 999999}, {}),
    ("tokenize", "chat", "POST", "/tokenize", {"model": "tiny-llama", "prompt": "Hello world"}, {}),
    ("detokenize", "chat", "POST", "/detokenize", {"model": "tiny-llama", "tokens": [10, 20, 30]}, {}),
    (
        "reset_prefix_cache",
        "chat",
        "POST",
        "/reset_prefix_cache?reset_running_requests=false&reset_external=false",
        None,
        {},
    ),
    ("reset_mm_cache", "chat", "POST", "/reset_mm_cache", None, {}),
    ("embed_models", "embed", "GET", "/v1/models", None, {}),
    (
        "embeddings",
        "embed",
        "POST",
        "/v1/embeddings",
        {"model": "minilm", "input": ["hello world", "bonjour"]},
        {},
    ),
    (
        "embeddings_base64",
        "embed",
        "POST",
        "/v1/embeddings",
        {"model": "minilm", "input": "hello", "encoding_format": "base64"},
        {},
    ),
    (
        "err_embeddings_dimensions",
        "embed",
        "POST",
        "/v1/embeddings",
        {"model": "minilm", "input": "hello", "dimensions": 8},
        {},
    ),
    (
        "err_embeddings_on_generate_model",
        "chat",
        "POST",
        "/v1/embeddings",
        {"model": "tiny-llama", "input": "hello"},
        {},
    ),
    (
        "err_chat_on_pooling_model",
        "embed",
        "POST",
        "/v1/chat/completions",
        {"model": "minilm", "messages": HELLO},
        {},
    ),
    ("err_api_key_missing", "reasoning", "GET", "/v1/models", None, {}),
    ("err_api_key_wrong", "reasoning", "GET", "/v1/models", None, {"Authorization": "Bearer wrong-key"}),
    ("health_with_api_key_server", "reasoning", "GET", "/health", None, {}),
] + [
    (
        path.stem,
        "reasoning",
        "POST",
        "/v1/chat/completions",
        json.loads(path.read_text()),
        {"Authorization": f"Bearer {API_KEY}"},
    )
    for path in sorted((DATA_DIR / "requests").glob("*.json"))
]

# Fields whose null-or-text depends on the sample, not on the server (see tests/data/vllm/README.md).
SAMPLE_DEPENDENT = {"chat_reasoning": frozenset({"$.choices[].message.content"})}
SLEEP_SEQUENCE = [
    ("sleep", "POST", "/sleep?level=1"),
    ("is_sleeping", "GET", "/is_sleeping"),
    ("wake_up", "POST", "/wake_up?tags=weights&tags=kv_cache"),
    ("wake_up_all", "POST", "/wake_up"),
]


@pytest.fixture(scope="module")
def servers() -> Iterator[dict[str, SimulatorServer]]:
    """One simulator per recording server."""
    started = {name: SimulatorServer(config) for name, config in SERVER_CONFIGS.items()}
    for server in started.values():
        server.start()
    yield started
    for server in started.values():
        server.stop()


def _json_type(value: Any) -> str:
    """The JSON type of a decoded value."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    return {float: "number", str: "string", list: "array", dict: "object"}[type(value)]


def assert_same_shape(actual: Any, expected: Any, path: str = "$", loose: frozenset[str] = frozenset()) -> None:
    """Same keys in the same order, recursively, and the same JSON types; list items like the first one."""
    if path in loose and (actual is None or expected is None):
        return
    if isinstance(expected, dict):
        assert isinstance(actual, dict), f"{path}: expected an object, got {actual!r}"
        assert list(actual) == list(expected), f"{path}: keys {list(actual)} != {list(expected)}"
        for key, value in expected.items():
            assert_same_shape(actual[key], value, f"{path}.{key}", loose)
    elif isinstance(expected, list):
        assert isinstance(actual, list), f"{path}: expected an array, got {actual!r}"
        assert bool(actual) == bool(expected), f"{path}: emptiness differs"
        for item in actual:
            assert_same_shape(item, expected[0], f"{path}[]", loose)
    else:
        assert _json_type(actual) == _json_type(expected), f"{path}: {actual!r} is not like {expected!r}"


def test_shape_comparator_catches_differences() -> None:
    """The comparator rejects a missing key, a reordered key, a changed type and a null."""
    reference = {"a": 1, "b": {"c": "x", "d": None}, "e": [1.5]}
    assert_same_shape({"a": 2, "b": {"c": "y", "d": None}, "e": [0.5, 2.5]}, reference)
    for wrong in (
        {"a": 2, "b": {"c": "y"}, "e": [0.5]},
        {"b": {"c": "y", "d": None}, "a": 2, "e": [0.5]},
        {"a": "2", "b": {"c": "y", "d": None}, "e": [0.5]},
        {"a": 2, "b": {"c": None, "d": None}, "e": [0.5]},
        {"a": 2, "b": {"c": "y", "d": None}, "e": []},
    ):
        with pytest.raises(AssertionError):
            assert_same_shape(wrong, reference)


def _recorded(name: str) -> tuple[int, dict[str, str], str]:
    """The recorded status, headers (lower-case names) and body of transcript ``name``."""
    status_line, *header_lines = (DATA_DIR / f"{name}.headers").read_text().strip().splitlines()
    headers = dict(line.split(": ", 1) for line in header_lines if line)
    return (
        int(status_line.split()[1]),
        {key.lower(): value for key, value in headers.items()},
        (DATA_DIR / f"{name}.body").read_text(),
    )


def _frames(text: str) -> list[Any]:
    """The payloads of an SSE body (``[DONE]`` kept as a string); every frame must be ``data: ...``."""
    assert text.endswith("\n\n"), "an SSE body ends with a blank line"
    payloads = []
    for block in text[:-2].split("\n\n"):
        assert block.startswith("data: "), f"not a data frame: {block[:80]!r}"
        data = block[len("data: ") :]
        payloads.append(data if data == "[DONE]" else json.loads(data))
    return payloads


def _delta_kind(delta: dict[str, Any]) -> str:
    """What one chat delta carries."""
    if "role" in delta:
        return "role"
    if "tool_calls" in delta:
        return "tool_start" if "id" in delta["tool_calls"][0] else "tool_args"
    if "reasoning" in delta or "reasoning_content" in delta:
        return "reasoning"
    return "content" if delta else "empty"


def chunk_kind(payload: Any) -> str:
    """The kind of one stream frame: role, content, reasoning, tool_start, tool_args, finish, usage, done."""
    if payload == "[DONE]":
        return "done"
    if "error" in payload:
        return "error"
    if not payload["choices"]:
        return "usage"
    choice = payload["choices"][0]
    kind = _delta_kind(choice["delta"]) if "delta" in choice else "text"
    if choice["finish_reason"] is not None:
        return "finish" if kind in ("empty", "text") else f"finish+{kind}"
    return kind


def _collapsed(kinds: list[str]) -> list[str]:
    """``kinds`` with runs of one kind merged."""
    return [kind for index, kind in enumerate(kinds) if index == 0 or kinds[index - 1] != kind]


def assert_same_stream(actual_text: str, recorded_text: str) -> None:
    """Same SSE framing, the same sequence of chunk kinds, and each chunk shaped like the recorded one."""
    actual, recorded = _frames(actual_text), _frames(recorded_text)
    assert actual[-1] == "[DONE]"
    actual_kinds = [chunk_kind(payload) for payload in actual]
    recorded_kinds = [chunk_kind(payload) for payload in recorded]
    assert _collapsed(actual_kinds) == _collapsed(recorded_kinds)
    examples = dict(zip(recorded_kinds, recorded, strict=True))
    for kind, payload in zip(actual_kinds, actual, strict=True):
        assert_same_shape(payload, examples[kind], f"$<{kind}>")


def assert_like_recording(name: str, response: httpx.Response) -> None:
    """``response`` has the status, header kinds and body shape of recording ``name``."""
    status, headers, body = _recorded(name)
    assert response.status_code == status
    assert response.headers.get("content-type") == headers.get("content-type")
    for header in ("vary", "content-length", "transfer-encoding"):
        assert (header in response.headers) == (header in headers), f"header {header}"
    if not body:
        assert response.content == b""
    elif headers.get("content-type", "").startswith("text/event-stream"):
        assert_same_stream(response.text, body)
    else:
        assert_same_shape(response.json(), json.loads(body), loose=SAMPLE_DEPENDENT.get(name, frozenset()))


@pytest.mark.parametrize(("name", "server", "method", "path", "body", "headers"), CASES, ids=[c[0] for c in CASES])
def test_answer_is_shaped_like_vllm(
    servers: dict[str, SimulatorServer],
    name: str,
    server: str,
    method: str,
    path: str,
    body: dict[str, Any] | None,
    headers: dict[str, str],
) -> None:
    """The recorded request gets an answer shaped like the recorded one."""
    url = servers[server].url + path
    response = httpx.request(method, url, json=body, headers=headers, timeout=CLIENT_TIMEOUT_S)
    assert_like_recording(name, response)


def test_sleep_routes_are_shaped_like_vllm(servers: dict[str, SimulatorServer]) -> None:
    """Sleep, is_sleeping while asleep, wake_up with tags and without: vLLM 0.32's JSON answers."""
    url = servers["chat"].url
    for name, method, path in SLEEP_SEQUENCE:
        assert_like_recording(name, httpx.request(method, url + path, timeout=CLIENT_TIMEOUT_S))
    assert httpx.get(f"{url}/is_sleeping").json() == {"is_sleeping": False}


def test_sleep_abort_ends_stream_like_vllm(servers: dict[str, SimulatorServer]) -> None:
    """``sleep?mode=abort`` ends a running stream with a last token chunk whose finish_reason is abort."""
    server = servers["chat"]
    server.configure(itl_s=0.005)
    body = {
        **CHAT,
        "max_tokens": 1800,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    try:
        lines = []
        with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=CLIENT_TIMEOUT_S) as r:
            for line in r.iter_lines():
                lines.append(line)
                if sum(item.startswith("data: ") for item in lines) == ABORT_AFTER_FRAMES:
                    slept = httpx.post(f"{server.url}/sleep?level=1&mode=abort", timeout=CLIENT_TIMEOUT_S)
                    assert slept.json() == {"status": "sleeping", "level": 1}
            headers = r.headers
        _, recorded_headers, recorded = _recorded("chat_stream_aborted_by_sleep")
        assert headers["content-type"] == recorded_headers["content-type"]
        text = "\n".join(lines) + "\n"
        assert_same_stream(text, recorded)
        finish = [chunk for chunk in _frames(text) if chunk != "[DONE]" and chunk["choices"]][-1]
        assert finish["choices"][0]["finish_reason"] == "abort"
    finally:
        httpx.post(f"{server.url}/wake_up", timeout=CLIENT_TIMEOUT_S)
        server.reset()
    # a stream's request ends just after its last frame
    wait_until(lambda: server.stats()["in_flight"] == 0, 15.0, "the aborted stream's request ending", interval_s=0.01)


def test_metrics_have_vllm_names_and_labels(servers: dict[str, SimulatorServer]) -> None:
    """Every sample family the simulator exposes appears in vLLM's own /metrics with the same labels."""
    recorded = (DATA_DIR / "metrics.txt").read_text()
    response = httpx.get(f"{servers['chat'].url}/metrics", timeout=CLIENT_TIMEOUT_S)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")

    def families(text: str) -> dict[str, str]:
        """Metric name -> TYPE."""
        return {line.split()[2]: line.split()[3] for line in text.splitlines() if line.startswith("# TYPE ")}

    def label_names(text: str, name: str) -> set[frozenset[str]]:
        """The label-name sets of the samples of ``name``."""
        found = set()
        for line in text.splitlines():
            if line.startswith(name + "{"):
                labels = line[len(name) + 1 : line.index("}")]
                found.add(frozenset(part.split("=")[0] for part in labels.split(",")))
        return found

    ours, theirs = families(response.text), families(recorded)
    required = {
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc",
        "vllm:prompt_tokens_total",
        "vllm:generation_tokens_total",
        "vllm:time_to_first_token_seconds",
        "vllm:e2e_request_latency_seconds",
        "vllm:request_queue_time_seconds",
    }
    assert required <= set(ours)
    for name, kind in ours.items():
        if name in theirs:
            assert theirs[name] == kind
            sample = name + "_bucket" if kind == "histogram" else name
            assert label_names(response.text, sample) == label_names(recorded, sample)
