"""The client against recorded vLLM answers (``httpx.MockTransport``): every call and error, the api key."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from httpx_sse import SSEError

from provider.settings import InstanceSettings, Settings, Timeouts
from provider.vllm import (
    AuthenticationError,
    BadRequestError,
    ChatRequest,
    EmbedRequest,
    GenerationAbortedError,
    InvalidResponseError,
    NotFoundError,
    ProviderConfigurationError,
    ProviderConnectionError,
    ProviderError,
    ProviderStatusError,
    ProviderTimeoutError,
    ServerBusyError,
    ServerError,
    StreamAccumulator,
    StreamInterruptedError,
    VllmClient,
    is_retryable,
    probe,
)
from provider.vllm.models import ChatResponse
from tests.provider.conftest import API_KEY, TRANSCRIPTS_DIR, FakeVllm, transcript_body

MESSAGES = [{"role": "user", "content": "Hello"}]
CHAT = "POST /v1/chat/completions"
STREAM_TRANSCRIPTS = [
    "chat_stream_usage",
    "chat_stream_continuous_usage",
    "chat_reasoning_stream",
    "chat_tool_call_named_stream",
    "chat_tool_call_auto_stream",
    "chat_stream_aborted_by_sleep",
]


def chat_request(**fields: Any) -> ChatRequest:
    return ChatRequest(model="tiny-llama", messages=MESSAGES, **fields)


def collect(client: VllmClient, request: ChatRequest, **options: Any) -> ChatResponse:
    accumulator = StreamAccumulator()
    with client.stream_chat(request, **options) as stream:
        for chunk in stream:
            accumulator.add(chunk)
    return accumulator.result()


def chat_answer(content: str | None, reasoning: str | None = None) -> httpx.Response:
    body = json.loads(transcript_body("chat"))
    body["choices"][0]["message"].update(content=content, reasoning=reasoning)
    return httpx.Response(200, json=body)


class RecordingStream(httpx.SyncByteStream):
    """A body yielding the given pieces (pausing between them, or raising at the end); records close()."""

    def __init__(self, pieces: list[bytes], *, pause_s: float = 0.0, error: Exception | None = None) -> None:
        self.pieces = pieces
        self.pause_s = pause_s
        self.error = error
        self.closed = False
        self.sent = 0

    def __iter__(self) -> Iterator[bytes]:
        for piece in self.pieces:
            if self.sent and self.pause_s:
                time.sleep(self.pause_s)
            self.sent += 1
            yield piece
        if self.error is not None:
            raise self.error

    def close(self) -> None:
        self.closed = True


def sse_pieces(name: str) -> list[bytes]:
    """A recorded stream cut at its event boundaries."""
    return [event + b"\n\n" for event in transcript_body(name).split(b"\n\n") if event]


def event_stream(stream: httpx.SyncByteStream) -> httpx.Response:
    return httpx.Response(200, headers={"content-type": "text/event-stream"}, stream=stream)


class TestGeneration:
    @pytest.mark.parametrize("name", ["chat", "chat_reasoning", "chat_tool_call_named", "chat_tool_call_auto"])
    def test_chat_transcripts(self, fake_vllm: FakeVllm, name: str) -> None:
        fake_vllm.answer(CHAT, name)
        response = fake_vllm.client().chat(chat_request())
        expected = json.loads(transcript_body(name))
        assert response.id == expected["id"]
        assert response.finish_reason == expected["choices"][0]["finish_reason"]
        assert len(response.tool_calls) == len(expected["choices"][0]["message"].get("tool_calls") or [])

    def test_chat_sends_the_built_payload_as_json(self, fake_vllm: FakeVllm) -> None:
        fake_vllm.answer(CHAT, "chat_thinking_kwargs")
        fake_vllm.client().chat(chat_request(max_tokens=4, stop_sequences=["x"], reasoning_effort="low"))
        request = fake_vllm.requests[-1]
        assert request.headers["content-type"] == "application/json"
        assert fake_vllm.last_json() == {
            "model": "tiny-llama",
            "messages": MESSAGES,
            "max_tokens": 4,
            "stop": ["x"],
            "chat_template_kwargs": {"enable_thinking": True},
        }

    def test_client_thinking_default_off(self, fake_vllm: FakeVllm) -> None:
        fake_vllm.answer(CHAT, "chat")
        client = VllmClient(
            InstanceSettings(name="gpu1", base_url="http://gpu1.test:8000"),
            http=httpx.Client(transport=httpx.MockTransport(fake_vllm.handle)),
            enable_thinking=False,
        )
        client.chat(chat_request())
        assert "chat_template_kwargs" not in fake_vllm.last_json()

    def test_tags_source_moves_think_spans_to_reasoning(self, fake_vllm: FakeVllm) -> None:
        fake_vllm.answer(CHAT, lambda request: chat_answer("<think>plan</think>answer"))
        response = fake_vllm.client(reasoning_source="tags").chat(chat_request())
        assert (response.content, response.reasoning) == ("answer", "plan")

    def test_preamble_source(self, fake_vllm: FakeVllm) -> None:
        fake_vllm.answer(CHAT, lambda request: chat_answer("plan</think>answer"))
        response = fake_vllm.client(reasoning_source="preamble").chat(chat_request())
        assert (response.content, response.reasoning) == ("answer", "plan")

    def test_a_model_that_never_thinks_keeps_its_answer_under_every_source(self, fake_vllm: FakeVllm) -> None:
        fake_vllm.answer(CHAT, lambda request: chat_answer("plain answer"))
        for source in ("server", "tags", "preamble"):
            response = fake_vllm.client(reasoning_source=source).chat(chat_request())
            assert (response.content, response.reasoning) == ("plain answer", None)

    def test_server_source_leaves_tags_in_content(self, fake_vllm: FakeVllm) -> None:
        fake_vllm.answer(CHAT, lambda request: chat_answer("<think>x</think>y", "server side"))
        response = fake_vllm.client().chat(chat_request())
        assert (response.content, response.reasoning) == ("<think>x</think>y", "server side")

    @pytest.mark.parametrize("name", STREAM_TRANSCRIPTS)
    def test_every_stream_transcript_read_in_small_pieces(self, fake_vllm: FakeVllm, name: str) -> None:
        fake_vllm.answer(CHAT, name, piece_size=7)
        if name == "chat_stream_aborted_by_sleep":
            with pytest.raises(GenerationAbortedError):
                collect(fake_vllm.client(), chat_request())
            return
        result = collect(fake_vllm.client(), chat_request())
        body = transcript_body(name).decode()
        assert result.id
        assert result.id in body
        assert result.usage is not None
        assert result.finish_reason in ("stop", "length", "tool_calls", "abort")

    def test_stream_payload_and_accept_header(self, fake_vllm: FakeVllm) -> None:
        fake_vllm.answer(CHAT, "chat_stream_usage")
        collect(fake_vllm.client(), chat_request())
        body = fake_vllm.last_json()
        assert body["stream"] is True
        assert body["stream_options"] == {"include_usage": True}
        assert "text/event-stream" in fake_vllm.requests[-1].headers["accept"]

    def test_stream_with_tags_split_across_network_pieces(self, fake_vllm: FakeVllm) -> None:
        frames = "".join(
            "data: "
            + json.dumps({"id": "c", "model": "m", "choices": [{"index": 0, "delta": {"content": text}}]})
            + "\n\n"
            for text in ["<thi", "nk>pl", "an</think", ">answer"]
        )
        body = (frames + "data: [DONE]\n\n").encode()
        fake_vllm.answer(
            CHAT,
            lambda request: event_stream(RecordingStream([body[i : i + 5] for i in range(0, len(body), 5)])),
        )
        result = collect(fake_vllm.client(reasoning_source="tags"), chat_request())
        assert (result.content, result.reasoning) == ("answer", "plan")

    def test_closing_a_stream_early_closes_the_http_response(self, fake_vllm: FakeVllm) -> None:
        body = RecordingStream(sse_pieces("chat_stream_aborted_by_sleep"))
        fake_vllm.answer(CHAT, lambda request: event_stream(body))
        stream = fake_vllm.client().stream_chat(chat_request())
        with stream:
            next(stream)
            next(stream)
        assert body.closed
        assert stream.closed
        assert body.sent < len(body.pieces)
        assert list(stream) == []

    def test_a_finished_stream_closes_itself(self, fake_vllm: FakeVllm) -> None:
        body = RecordingStream(sse_pieces("chat_stream_usage"))
        fake_vllm.answer(CHAT, lambda request: event_stream(body))
        stream = fake_vllm.client().stream_chat(chat_request())
        assert len(list(stream)) == 8
        assert body.closed
        assert stream.closed

    def test_a_dropped_stream_is_interrupted_and_retryable(self, fake_vllm: FakeVllm) -> None:
        fake_vllm.answer(CHAT, "chat_stream_usage", piece_size=50, break_after=900)
        with pytest.raises(StreamInterruptedError) as caught:
            collect(fake_vllm.client(), chat_request())
        assert is_retryable(caught.value)
        assert caught.value.instance == "gpu1"

    def test_a_stream_without_done_is_interrupted(self, fake_vllm: FakeVllm) -> None:
        pieces = sse_pieces("chat_stream_usage")[:-1]
        fake_vllm.answer(CHAT, lambda request: event_stream(RecordingStream(pieces)))
        with pytest.raises(StreamInterruptedError, match="without \\[DONE\\]"):
            collect(fake_vllm.client(), chat_request())

    def test_an_error_frame_closes_the_stream(self, fake_vllm: FakeVllm) -> None:
        frame = {"error": {"message": "boom", "type": "InternalServerError", "param": None, "code": 500}}
        error = f"data: {json.dumps(frame)}\n\n".encode()
        body = RecordingStream([*sse_pieces("chat_stream_usage")[:2], error, b"data: [DONE]\n\n"])
        fake_vllm.answer(CHAT, lambda request: event_stream(body))
        with pytest.raises(ProviderError, match="boom") as caught:
            collect(fake_vllm.client(), chat_request())
        assert caught.value.code == "server_error", "a 500 frame reads as a 500 answer would"
        assert body.closed

    def test_the_deadline_is_checked_between_chunks(self, fake_vllm: FakeVllm) -> None:
        body = RecordingStream(sse_pieces("chat_stream_aborted_by_sleep"), pause_s=0.05)
        fake_vllm.answer(CHAT, lambda request: event_stream(body))
        with pytest.raises(ProviderTimeoutError, match="deadline"):
            collect(fake_vllm.client(), chat_request(), timeout_s=0.3)
        assert body.sent < len(body.pieces), "the stream was read to its end instead of cut at the deadline"
        assert body.closed

    def test_a_stream_answered_with_an_error_status(self, fake_vllm: FakeVllm) -> None:
        fake_vllm.answer(CHAT, "err_max_tokens_too_large")
        with pytest.raises(BadRequestError, match="max_tokens=999999"):
            fake_vllm.client().stream_chat(chat_request())

    def test_a_stream_answered_with_json_instead_of_events(self, fake_vllm: FakeVllm) -> None:
        fake_vllm.answer(CHAT, "chat")
        with pytest.raises(InvalidResponseError):
            collect(fake_vllm.client(), chat_request())

    def test_complete(self, fake_vllm: FakeVllm) -> None:
        fake_vllm.answer("POST /v1/completions", "completions")
        response = fake_vllm.client().complete("tiny-llama", "Hello", max_tokens=5, temperature=0)
        assert response.id == "cmpl-a8a3e82b364c046c"
        assert response.usage is not None
        assert response.usage.completion_tokens == 5
        assert fake_vllm.last_json() == {
            "model": "tiny-llama",
            "prompt": "Hello",
            "max_tokens": 5,
            "temperature": 0,
        }

    def test_embed_a_batch(self, fake_vllm: FakeVllm) -> None:
        fake_vllm.answer("POST /v1/embeddings", "embeddings")
        response = fake_vllm.client().embed(EmbedRequest(model="minilm", input=["hello world", "bonjour"]))
        assert [len(vector) for vector in response.vectors] == [384, 384]
        assert fake_vllm.last_json() == {
            "model": "minilm",
            "input": ["hello world", "bonjour"],
            "encoding_format": "float",
        }

    def test_embed_base64(self, fake_vllm: FakeVllm) -> None:
        fake_vllm.answer("POST /v1/embeddings", "embeddings_base64")
        response = fake_vllm.client().embed(EmbedRequest(model="minilm", input="hello", encoding_format="base64"))
        assert len(response.vectors[0]) == 384
        assert all(isinstance(value, float) for value in response.vectors[0])


class TestStateAndDiscovery:
    def test_health(self, fake_vllm: FakeVllm) -> None:
        fake_vllm.answer("GET /health", "health")
        assert fake_vllm.client().health() is True
        fake_vllm.answer("GET /health", lambda request: httpx.Response(503))
        assert fake_vllm.client().health() is False

    def test_health_of_something_that_is_not_vllm(self, fake_vllm: FakeVllm) -> None:
        with pytest.raises(NotFoundError):
            fake_vllm.client().health()

    def test_health_when_nothing_listens(self) -> None:
        client = VllmClient(InstanceSettings(name="gone", base_url="http://127.0.0.1:9"))
        with client, pytest.raises(ProviderConnectionError):
            client.health(timeout_s=2)

    def test_version_and_load(self, fake_vllm: FakeVllm) -> None:
        fake_vllm.answer("GET /version", "version")
        fake_vllm.answer("GET /load", "load")
        client = fake_vllm.client()
        assert client.version() == "0.32.0"
        assert client.load() == 0

    def test_model_detail_is_cached_and_list_models_warms_the_cache(self, fake_vllm: FakeVllm) -> None:
        fake_vllm.answer("GET /v1/models", "models")
        client = fake_vllm.client()
        assert client.list_models()[0].id == "tiny-llama"
        assert client.model_detail("tiny-llama").context_window == 2048
        assert client.model_detail("tiny-llama").max_model_len == 2048
        assert len(fake_vllm.requests) == 1

    def test_model_detail_cache_expires(self, fake_vllm: FakeVllm) -> None:
        fake_vllm.answer("GET /v1/models", "models")
        client = VllmClient(
            InstanceSettings(name="gpu1", base_url="http://gpu1.test:8000"),
            http=httpx.Client(transport=httpx.MockTransport(fake_vllm.handle)),
            model_cache_ttl_s=0.05,
        )
        client.model_detail("tiny-llama")
        time.sleep(0.1)
        client.model_detail("tiny-llama")
        assert len(fake_vllm.requests) == 2

    def test_a_miss_raises_and_is_not_cached(self, fake_vllm: FakeVllm) -> None:
        fake_vllm.answer("GET /v1/models", "models")
        client = fake_vllm.client()
        for _ in range(2):
            with pytest.raises(NotFoundError, match="nope"):
                client.model_detail("nope")
        assert len(fake_vllm.requests) == 2

    def test_errors_are_not_cached(self, fake_vllm: FakeVllm) -> None:
        fake_vllm.answer("GET /v1/models", lambda request: httpx.Response(500, text="oops"))
        client = fake_vllm.client()
        with pytest.raises(ServerError):
            client.model_detail("tiny-llama")
        fake_vllm.answer("GET /v1/models", "models")
        assert client.model_detail("tiny-llama").id == "tiny-llama"

    def test_model_detail_from_many_threads(self, fake_vllm: FakeVllm) -> None:
        fake_vllm.answer("GET /v1/models", "models")
        client = fake_vllm.client()
        results: list[int | None] = []

        def look_up() -> None:
            for _ in range(50):
                results.append(client.model_detail("tiny-llama").context_window)

        threads = [threading.Thread(target=look_up) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert results == [2048] * 400

    def test_tokenize_count_and_detokenize(self, fake_vllm: FakeVllm) -> None:
        fake_vllm.answer("POST /tokenize", "tokenize")
        fake_vllm.answer("POST /detokenize", "detokenize")
        client = fake_vllm.client()
        assert client.tokenize("tiny-llama", prompt="Hello world").tokens == [411, 408]
        assert fake_vllm.last_json() == {"model": "tiny-llama", "prompt": "Hello world"}
        assert client.tokenize("tiny-llama", messages=MESSAGES).count == 2
        assert fake_vllm.last_json() == {
            "model": "tiny-llama",
            "messages": MESSAGES,
            "add_generation_prompt": True,
            "chat_template_kwargs": {"enable_thinking": True},
        }
        assert client.detokenize("tiny-llama", [10, 20, 30]) == "$.8"
        with pytest.raises(ValueError, match="exactly one"):
            client.tokenize("tiny-llama")

    def test_metrics(self, fake_vllm: FakeVllm) -> None:
        page = (TRANSCRIPTS_DIR / "metrics.txt").read_text()
        fake_vllm.answer("GET /metrics", lambda request: httpx.Response(200, text=page))
        assert fake_vllm.client().metrics().generation_tokens_total == 52

    def test_readiness_of_a_ready_server(self, fake_vllm: FakeVllm) -> None:
        fake_vllm.answer("GET /health", "health")
        fake_vllm.answer("GET /v1/models", "models")
        readiness = fake_vllm.client().readiness()
        assert readiness.model_dump(mode="json", exclude={"endpoints"}) == {
            "provider": "vllm",
            "instance": "gpu1",
            "configured": True,
            "ready": True,
            "local": False,
            "base_url": "http://gpu1.test:8000",
            "live": True,
            "health": {"checked": True, "ok": True, "error": None},
            "models": ["tiny-llama"],
        }
        assert readiness.endpoints["chat"] == "/v1/chat/completions"

    def test_readiness_of_a_dead_engine(self, fake_vllm: FakeVllm) -> None:
        fake_vllm.answer("GET /health", lambda request: httpx.Response(503))
        readiness = fake_vllm.client().readiness()
        assert (readiness.live, readiness.ready, readiness.health.checked) == (False, False, False)
        assert readiness.health.error

    def test_readiness_when_models_fail(self, fake_vllm: FakeVllm) -> None:
        fake_vllm.answer("GET /health", "health")
        fake_vllm.answer("GET /v1/models", "err_api_key_missing")
        readiness = fake_vllm.client().readiness()
        assert (readiness.live, readiness.ready, readiness.health.checked) == (True, False, True)
        assert readiness.health.error is not None
        assert "Unauthorized" in readiness.health.error

    def test_readiness_when_no_model_is_listed(self, fake_vllm: FakeVllm) -> None:
        fake_vllm.answer("GET /health", "health")
        fake_vllm.answer("GET /v1/models", lambda request: httpx.Response(200, json={"object": "list", "data": []}))
        readiness = fake_vllm.client().readiness()
        assert (readiness.live, readiness.ready, readiness.health.ok) == (True, False, False)

    def test_readiness_never_raises(self) -> None:
        with VllmClient(InstanceSettings(name="gone", base_url="http://127.0.0.1:9")) as client:
            readiness = client.readiness(timeout_s=2)
        assert (readiness.live, readiness.ready, readiness.local) == (False, False, True)
        assert readiness.health.error

    def test_an_instance_without_url(self) -> None:
        client = VllmClient(InstanceSettings(name="empty"))
        readiness = client.readiness()
        assert (readiness.configured, readiness.live) == (False, False)
        with pytest.raises(ProviderConfigurationError, match="no base_url"):
            client.version()


class TestManagement:
    def test_new_json_answers(self, fake_vllm: FakeVllm) -> None:
        for route, name in [
            ("POST /sleep", "sleep"),
            ("GET /is_sleeping", "is_sleeping"),
            ("POST /wake_up", "wake_up"),
            ("POST /reset_prefix_cache", "reset_prefix_cache"),
            ("POST /reset_mm_cache", "reset_mm_cache"),
        ]:
            fake_vllm.answer(route, name)
        client = fake_vllm.client()
        assert client.sleep(level=1) == {"status": "sleeping", "level": 1}
        assert client.is_sleeping() is True
        assert client.wake_up(["weights", "kv_cache"]) == {"status": "awake", "tags": ["weights", "kv_cache"]}
        assert str(fake_vllm.requests[-1].url).endswith("/wake_up?tags=weights&tags=kv_cache")
        assert client.reset_prefix_cache() is True
        assert fake_vllm.requests[-1].url.params == httpx.QueryParams(
            {"reset_running_requests": "false", "reset_external": "false"}
        )
        assert client.reset_mm_cache() is None
        fake_vllm.answer("POST /wake_up", "wake_up_all")
        assert client.wake_up() == {"status": "awake", "tags": None}
        assert fake_vllm.requests[-1].url.query == b""

    def test_old_empty_answers(self, fake_vllm: FakeVllm) -> None:
        for route in ("POST /sleep", "POST /wake_up", "POST /reset_prefix_cache", "POST /reset_mm_cache"):
            fake_vllm.answer(route, lambda request: httpx.Response(200))
        client = fake_vllm.client()
        assert client.sleep(level=2, mode="abort") == {"status": "sleeping", "level": 2}
        assert fake_vllm.requests[-1].url.params == httpx.QueryParams({"level": "2", "mode": "abort"})
        assert client.wake_up(["weights"]) == {"status": "awake", "tags": ["weights"]}
        assert client.wake_up() == {"status": "awake", "tags": None}
        assert client.reset_prefix_cache(reset_running_requests=True) is None
        assert fake_vllm.requests[-1].url.params["reset_running_requests"] == "true"
        assert client.reset_mm_cache() is None

    def test_dev_mode_off(self, fake_vllm: FakeVllm) -> None:
        with pytest.raises(NotFoundError, match="VLLM_SERVER_DEV_MODE=1"):
            fake_vllm.client().sleep()

    def test_a_wrong_shaped_management_answer(self, fake_vllm: FakeVllm) -> None:
        fake_vllm.answer("GET /is_sleeping", lambda request: httpx.Response(200, json={"sleeping": "yes"}))
        with pytest.raises(InvalidResponseError, match="is_sleeping"):
            fake_vllm.client().is_sleeping()


class TestErrors:
    @pytest.mark.parametrize(
        ("name", "route", "error_class", "message", "error_type", "param"),
        [
            (
                "err_unknown_model",
                CHAT,
                NotFoundError,
                "The model `nope` does not exist.",
                "NotFoundError",
                "model",
            ),
            (
                "err_validation",
                CHAT,
                BadRequestError,
                "Input should be a valid list",
                "Bad Request",
                "body.messages",
            ),
            (
                "err_context_too_long",
                CHAT,
                BadRequestError,
                "maximum context length is 2048",
                "BadRequestError",
                None,
            ),
            (
                "err_max_tokens_too_large",
                CHAT,
                BadRequestError,
                "max_tokens=999999",
                "BadRequestError",
                "max_tokens",
            ),
            ("err_chat_on_pooling_model", CHAT, NotFoundError, "Not Found", None, None),
        ],
    )
    def test_recorded_chat_errors(
        self,
        fake_vllm: FakeVllm,
        name: str,
        route: str,
        error_class: type[ProviderStatusError],
        message: str,
        error_type: str | None,
        param: str | None,
    ) -> None:
        fake_vllm.answer(route, name)
        with pytest.raises(error_class) as caught:
            fake_vllm.client().chat(chat_request())
        recorded = json.loads(transcript_body(name))
        if "error" in recorded:
            assert caught.value.message == recorded["error"]["message"]
        assert message in caught.value.message
        assert caught.value.error_type == error_type
        if param is not None:
            assert caught.value.param == param
        assert caught.value.instance == "gpu1"
        assert not is_retryable(caught.value)

    @pytest.mark.parametrize(
        ("name", "error_class", "message"),
        [
            ("err_embeddings_dimensions", BadRequestError, "does not support Matryoshka embeddings"),
            ("err_embeddings_on_generate_model", NotFoundError, "Not Found"),
        ],
    )
    def test_recorded_embedding_errors(
        self, fake_vllm: FakeVllm, name: str, error_class: type[ProviderError], message: str
    ) -> None:
        fake_vllm.answer("POST /v1/embeddings", name)
        with pytest.raises(error_class, match=message):
            fake_vllm.client().embed(EmbedRequest(model="minilm", input="hello", dimensions=8))

    @pytest.mark.parametrize("name", ["err_api_key_missing", "err_api_key_wrong"])
    def test_unauthorized(self, fake_vllm: FakeVllm, name: str) -> None:
        fake_vllm.answer("GET /v1/models", name)
        with pytest.raises(AuthenticationError, match="Unauthorized") as caught:
            fake_vllm.client().list_models()
        assert caught.value.status_code == 401

    def test_engine_busy_is_retryable(self, fake_vllm: FakeVllm) -> None:
        busy = {
            "error": {
                "message": "The engine is currently busy",
                "type": "ServiceUnavailableError",
                "code": 503,
            }
        }
        fake_vllm.answer(CHAT, lambda request: httpx.Response(503, json=busy))
        with pytest.raises(ServerBusyError, match="currently busy") as caught:
            fake_vllm.client().chat(chat_request())
        assert is_retryable(caught.value)

    def test_a_proxy_error_page(self, fake_vllm: FakeVllm) -> None:
        fake_vllm.answer(CHAT, lambda request: httpx.Response(502, text="<html>Bad Gateway</html>"))
        with pytest.raises(ServerError, match="Bad Gateway") as caught:
            fake_vllm.client().chat(chat_request())
        assert is_retryable(caught.value)

    def test_fastapi_validation_detail_list(self, fake_vllm: FakeVllm) -> None:
        detail = {"detail": [{"loc": ["body", "model"], "msg": "field required", "type": "missing"}]}
        fake_vllm.answer(CHAT, lambda request: httpx.Response(422, json=detail))
        with pytest.raises(BadRequestError, match="field required"):
            fake_vllm.client().chat(chat_request())

    @pytest.mark.parametrize(
        "answer",
        [
            httpx.Response(200, text="<html>not json</html>"),
            httpx.Response(200, json={"object": "list"}),
            httpx.Response(200, json=["a list"]),
        ],
    )
    def test_a_200_that_is_not_vllms(self, fake_vllm: FakeVllm, answer: httpx.Response) -> None:
        fake_vllm.answer(CHAT, lambda request: answer)
        with pytest.raises(InvalidResponseError) as caught:
            fake_vllm.client().chat(chat_request())
        assert caught.value.instance == "gpu1"

    def test_no_time_left_sends_nothing(self, fake_vllm: FakeVllm) -> None:
        with pytest.raises(ProviderTimeoutError):
            fake_vllm.client().chat(chat_request(), timeout_s=0)
        assert fake_vllm.requests == []

    def test_http_timeouts_come_from_the_time_left(self, fake_vllm: FakeVllm) -> None:
        fake_vllm.answer(CHAT, "chat")
        fake_vllm.client().chat(chat_request(), timeout_s=2.5)
        timeouts = fake_vllm.requests[-1].extensions["timeout"]
        assert 2.4 < timeouts["read"] <= 2.5
        assert timeouts["connect"] <= 2.5

    def test_default_timeouts_per_operation(self, fake_vllm: FakeVllm) -> None:
        fake_vllm.answer(CHAT, "chat")
        fake_vllm.answer("POST /v1/embeddings", "embeddings")
        client = VllmClient(
            InstanceSettings(name="gpu1", base_url="http://gpu1.test:8000"),
            http=httpx.Client(transport=httpx.MockTransport(fake_vllm.handle)),
            timeouts=Timeouts(chat_s=7, embed_s=3, connect_s=1),
        )
        client.chat(chat_request())
        assert 6.9 < fake_vllm.requests[-1].extensions["timeout"]["read"] <= 7
        assert fake_vllm.requests[-1].extensions["timeout"]["connect"] == 1
        client.embed(EmbedRequest(model="minilm", input="x"))
        assert 2.9 < fake_vllm.requests[-1].extensions["timeout"]["read"] <= 3


def _concrete_subclasses(root: type[Exception]) -> set[type[Exception]]:
    found: set[type[Exception]] = set()
    for subclass in root.__subclasses__():
        found.add(subclass)
        found |= _concrete_subclasses(subclass)
    return found


# What each httpx error becomes before the answer, and in the middle of a stream.
TRANSPORT_ERROR_MAP: dict[type[Exception], tuple[type[ProviderError], type[ProviderError]]] = {
    httpx.ConnectTimeout: (ProviderTimeoutError, ProviderTimeoutError),
    httpx.ReadTimeout: (ProviderTimeoutError, ProviderTimeoutError),
    httpx.WriteTimeout: (ProviderTimeoutError, ProviderTimeoutError),
    httpx.PoolTimeout: (ProviderTimeoutError, ProviderTimeoutError),
    httpx.ConnectError: (ProviderConnectionError, StreamInterruptedError),
    httpx.ReadError: (ProviderConnectionError, StreamInterruptedError),
    httpx.WriteError: (ProviderConnectionError, StreamInterruptedError),
    httpx.CloseError: (ProviderConnectionError, StreamInterruptedError),
    httpx.RemoteProtocolError: (ProviderConnectionError, StreamInterruptedError),
    httpx.ProxyError: (ProviderConnectionError, StreamInterruptedError),
    httpx.LocalProtocolError: (ProviderConfigurationError, ProviderConfigurationError),
    httpx.UnsupportedProtocol: (ProviderConfigurationError, ProviderConfigurationError),
    httpx.DecodingError: (InvalidResponseError, InvalidResponseError),
    httpx.TooManyRedirects: (InvalidResponseError, InvalidResponseError),
    SSEError: (InvalidResponseError, InvalidResponseError),
}
# Bases only ever raised as one of their subclasses, and the one error the client never raises (it never
# calls ``raise_for_status``: statuses are mapped by ``error_for_status``).
NOT_RAISED_BY_HTTPX = {
    httpx.TransportError,
    httpx.TimeoutException,
    httpx.NetworkError,
    httpx.ProtocolError,
    httpx.RequestError,
    httpx.HTTPStatusError,
}


class TestTransportErrorMapping:
    def test_the_map_covers_every_httpx_error(self) -> None:
        assert _concrete_subclasses(httpx.HTTPError) - NOT_RAISED_BY_HTTPX == set(TRANSPORT_ERROR_MAP)

    @pytest.mark.parametrize("httpx_error", sorted(TRANSPORT_ERROR_MAP, key=lambda cls: cls.__name__))
    def test_before_the_answer(self, fake_vllm: FakeVllm, httpx_error: type[Exception]) -> None:
        def fail(request: httpx.Request) -> httpx.Response:
            raise httpx_error("it broke")

        fake_vllm.answer(CHAT, fail)
        expected = TRANSPORT_ERROR_MAP[httpx_error][0]
        with pytest.raises(expected) as caught:
            fake_vllm.client().chat(chat_request())
        assert type(caught.value) is expected
        assert "it broke" in caught.value.message
        assert isinstance(caught.value.__cause__, httpx_error)

    @pytest.mark.parametrize("httpx_error", sorted(TRANSPORT_ERROR_MAP, key=lambda cls: cls.__name__))
    def test_in_the_middle_of_a_stream(self, fake_vllm: FakeVllm, httpx_error: type[Exception]) -> None:
        pieces = sse_pieces("chat_stream_usage")[:3]
        fake_vllm.answer(CHAT, lambda request: event_stream(RecordingStream(pieces, error=httpx_error("cut"))))
        expected = TRANSPORT_ERROR_MAP[httpx_error][1]
        with pytest.raises(expected) as caught:
            collect(fake_vllm.client(), chat_request())
        assert type(caught.value) is expected

    def test_invalid_url(self) -> None:
        client = VllmClient(InstanceSettings(name="bad", base_url="http://[::1"))
        with pytest.raises(ProviderConfigurationError):
            client.version()


class TestApiKey:
    def test_sent_as_bearer(self, fake_vllm: FakeVllm) -> None:
        fake_vllm.answer("GET /v1/models", "models")
        fake_vllm.client(api_key=API_KEY).list_models()
        assert fake_vllm.requests[-1].headers["authorization"] == f"Bearer {API_KEY}"

    def test_no_header_without_a_key(self, fake_vllm: FakeVllm) -> None:
        fake_vllm.answer("GET /v1/models", "models")
        fake_vllm.client().list_models()
        assert "authorization" not in fake_vllm.requests[-1].headers

    def test_never_in_repr_errors_or_logs(self, fake_vllm: FakeVllm, caplog: pytest.LogCaptureFixture) -> None:
        def echo_key(request: httpx.Request) -> httpx.Response:
            return httpx.Response(401, json={"error": f"bad key {request.headers['authorization']}"})

        def leak_in_exception(request: httpx.Request) -> httpx.Response:
            raise httpx.LocalProtocolError(f"Illegal header value {request.headers['authorization']!r}")

        fake_vllm.answer("GET /v1/models", echo_key)
        fake_vllm.answer(CHAT, leak_in_exception)
        caplog.set_level(logging.DEBUG)
        client = fake_vllm.client(api_key=API_KEY)
        texts = [repr(client), str(client), repr(client.instance), repr(vars(client))]
        with pytest.raises(AuthenticationError) as unauthorized:
            client.list_models()
        with pytest.raises(ProviderConfigurationError) as leaked:
            client.chat(chat_request())
        assert leaked.value.__cause__ is None
        for error in (unauthorized.value, leaked.value):
            texts += [str(error), repr(error), error.message]
        texts += [record.getMessage() for record in caplog.records]
        assert caplog.records
        assert not [text for text in texts if API_KEY in text]

    def test_a_key_no_header_can_carry_is_refused_without_showing_it(self) -> None:
        with pytest.raises(ProviderConfigurationError) as caught:
            VllmClient(InstanceSettings(name="gpu1", base_url="http://h:8000", api_key="bad key\n"))
        assert "bad key" not in str(caught.value)


class TestConstruction:
    def test_thinking_and_timeouts_from_settings(self, fake_vllm: FakeVllm) -> None:
        fake_vllm.answer(CHAT, "chat")
        settings = Settings(enable_thinking=True, timeouts=Timeouts(chat_s=9))
        instance = InstanceSettings(name="gpu1", base_url="http://gpu1.test:8000", enable_thinking=False)
        client = VllmClient(
            instance,
            http=httpx.Client(transport=httpx.MockTransport(fake_vllm.handle)),
            enable_thinking=settings.thinking_default(instance),
            timeouts=settings.timeouts,
        )
        client.chat(chat_request())
        assert "chat_template_kwargs" not in fake_vllm.last_json()
        assert 8.9 < fake_vllm.requests[-1].extensions["timeout"]["read"] <= 9

    def test_pool_is_sized_from_concurrency(self) -> None:
        with VllmClient(InstanceSettings(name="gpu1", base_url="http://h:8000", concurrency=16)) as client:
            pool = client._pools.clients[0]._transport._pool  # type: ignore[attr-defined]
            assert pool._max_connections == 20
            assert pool._max_keepalive_connections == 20

    def test_many_connections_are_split_into_pools_that_add_up(self) -> None:
        with VllmClient(InstanceSettings(name="gpu1", base_url="http://h:8000", concurrency=256)) as client:
            pools = client._pools
            assert len(pools.clients) == 9
            assert pools.connection_limits == [29] * 9  # 261 >= 256 + 4, none over SHARD_CONNECTIONS
            for http in pools.clients:
                pool = http._transport._inner._pool  # type: ignore[attr-defined]
                assert pool._max_connections == 29

    def test_an_injected_http_client_is_not_closed(self, fake_vllm: FakeVllm) -> None:
        http = httpx.Client(transport=httpx.MockTransport(fake_vllm.handle))
        with VllmClient(InstanceSettings(name="gpu1", base_url="http://h:8000"), http=http):
            pass
        assert not http.is_closed


class TestProbe:
    def test_health_answers(self, fake_vllm: FakeVllm) -> None:
        fake_vllm.answer("GET /health", "health")
        assert probe("http://localhost:8000/v1/", http=httpx.Client(transport=httpx.MockTransport(fake_vllm.handle)))
        assert str(fake_vllm.requests[-1].url) == "http://localhost:8000/health"

    def test_models_answer_when_health_does_not(self, fake_vllm: FakeVllm) -> None:
        fake_vllm.answer("GET /health", lambda request: httpx.Response(503))
        fake_vllm.answer("GET /v1/models", "models")
        assert probe("http://localhost:8000", http=httpx.Client(transport=httpx.MockTransport(fake_vllm.handle)))

    def test_nothing_there(self) -> None:
        started = time.monotonic()
        assert probe("http://127.0.0.1:9", timeout_s=0.1) is False
        assert time.monotonic() - started < 5  # refused at once: it never hangs (a loose bound, not a benchmark)

    def test_something_else_there(self, fake_vllm: FakeVllm) -> None:
        assert not probe("http://localhost:8000", http=httpx.Client(transport=httpx.MockTransport(fake_vllm.handle)))
