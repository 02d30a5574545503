"""The client over real HTTP against the vLLM simulator: calls, failure modes, cancellation, deadlines."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from provider.settings import InstanceSettings
from provider.vllm import (
    AuthenticationError,
    BadRequestError,
    ChatRequest,
    ChatResponse,
    EmbedRequest,
    GenerationAbortedError,
    NotFoundError,
    ProviderConnectionError,
    ProviderTimeoutError,
    ServerBusyError,
    ServerError,
    StreamAccumulator,
    StreamErrorFrame,
    StreamInterruptedError,
    VllmClient,
    is_retryable,
    probe,
)
from tests.conftest import wait_until

pytestmark = pytest.mark.integration

CHAT_MODEL = "qwen3-6-27b"
EMBED_MODEL = "minilm"
API_KEY = "sim-key-not-secret"
STATS_WAIT_S = 15.0  # a bound for a loaded host
HANG_S = 30  # a hung server answers after this: a call cut at its deadline returns long before


def chat_request(text: str = "Hello there", **fields: Any) -> ChatRequest:
    return ChatRequest(model=CHAT_MODEL, messages=[{"role": "user", "content": text}], **fields)


def collect(client: VllmClient, request: ChatRequest, **options: Any) -> ChatResponse:
    accumulator = StreamAccumulator()
    with client.stream_chat(request, **options) as stream:
        for chunk in stream:
            accumulator.add(chunk)
    return accumulator.result()


def wait_for(sim: Any, condition: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    """Poll the simulator's counters until ``condition`` holds (or fail after a few seconds)."""
    stats: dict[str, Any] = wait_until(
        lambda: current if condition(current := sim.stats()) else None, STATS_WAIT_S, "the simulator's state"
    )
    return stats


def counting_connects(connects: list[str]) -> Callable[[httpx.Request], None]:
    """An httpx request hook that notes every TCP connection opened (httpx's ``trace`` extension)."""

    def trace(event: str, info: dict[str, Any]) -> None:
        if event == "connection.connect_tcp.started":
            connects.append(event)

    def add_trace(request: httpx.Request) -> None:
        request.extensions["trace"] = trace

    return add_trace


def fail_next(sim: Any, **rule: Any) -> None:
    sim.configure(failures=[{"count": 1, **rule}])


@pytest.fixture
def client(sim: Any) -> Iterator[VllmClient]:
    """A client for the simulator, closed after the test."""
    with VllmClient(InstanceSettings(name="sim", base_url=sim.url, concurrency=8)) as live_client:
        yield live_client


class TestCalls:
    def test_chat(self, client: VllmClient, sim: Any) -> None:
        response = client.chat(chat_request(max_tokens=8))
        assert response.content == "Hello there"
        assert response.finish_reason == "stop"
        assert response.usage is not None
        assert response.usage.completion_tokens > 0
        assert sim.stats()["completed"] == 1

    def test_stream_chat_matches_chat(self, client: VllmClient) -> None:
        streamed = collect(client, chat_request())
        plain = client.chat(chat_request())
        assert (streamed.content, streamed.finish_reason) == (plain.content, plain.finish_reason)
        assert streamed.usage == plain.usage

    def test_stream_through_keep_alive_comments(self, client: VllmClient, sim: Any) -> None:
        sim.configure(ttft_s=0.3, keepalive_s=0.05)
        assert collect(client, chat_request()).content == "Hello there"

    def test_tool_calls(self, client: VllmClient) -> None:
        tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
        named = {"type": "function", "function": {"name": "get_weather"}}
        plain = client.chat(chat_request(tools=tools, tool_choice=named))
        streamed = collect(client, chat_request(tools=tools, tool_choice=named))
        for response in (plain, streamed):
            assert [call.function.name for call in response.tool_calls] == ["get_weather"]
            assert response.tool_calls[0].id

    def test_complete(self, client: VllmClient) -> None:
        response = client.complete(CHAT_MODEL, "Hello", max_tokens=5)
        assert response.id.startswith("cmpl-")
        assert response.usage is not None
        assert response.usage.prompt_tokens > 0

    def test_embed_float_and_base64_agree(self, client: VllmClient) -> None:
        floats = client.embed(EmbedRequest(model=EMBED_MODEL, input=["hello", "bonjour"]))
        packed = client.embed(EmbedRequest(model=EMBED_MODEL, input=["hello", "bonjour"], encoding_format="base64"))
        assert len(floats.vectors) == 2
        for plain, decoded in zip(floats.vectors, packed.vectors, strict=True):
            assert decoded == pytest.approx(plain, abs=1e-6)

    def test_tokenize_count_detokenize(self, client: VllmClient) -> None:
        result = client.tokenize(CHAT_MODEL, prompt="hello world")
        assert result.count == len(result.tokens) > 0
        assert client.detokenize(CHAT_MODEL, result.tokens).strip() == "hello world"
        assert client.tokenize(CHAT_MODEL, messages=[{"role": "user", "content": "hello"}]).count > 0

    def test_health_version_load_models(self, client: VllmClient) -> None:
        assert client.health() is True
        assert client.version() == "0.32.0"
        assert client.load() == 0
        assert [model.id for model in client.list_models()] == [CHAT_MODEL, EMBED_MODEL]
        assert client.model_detail(CHAT_MODEL).context_window == 32768

    def test_lora_adapter_inherits_the_context_window(self, client: VllmClient, sim: Any) -> None:
        sim.configure(
            models=[
                {"name": CHAT_MODEL, "max_model_len": 4096},
                {"name": "sql-lora", "parent": CHAT_MODEL},
            ]
        )
        adapter = client.model_detail("sql-lora")
        assert (adapter.parent, adapter.max_model_len, adapter.context_window) == (CHAT_MODEL, None, 4096)

    def test_model_detail_miss(self, client: VllmClient) -> None:
        with pytest.raises(NotFoundError):
            client.model_detail("nope")

    def test_model_detail_is_cached_and_a_miss_is_not(self, sim: Any) -> None:
        listings: list[str] = []

        def note(request: httpx.Request) -> None:
            if request.url.path == "/v1/models":
                listings.append(request.url.path)

        http = httpx.Client(event_hooks={"request": [note]})
        with VllmClient(InstanceSettings(name="sim", base_url=sim.url), http=http) as cached:
            cached.list_models()  # what discovery does: it warms the cache
            assert cached.model_detail(CHAT_MODEL).context_window == 32768
            assert cached.model_detail(EMBED_MODEL).context_window == 256
            assert len(listings) == 1  # both answered from the cache
            for _ in range(2):
                with pytest.raises(NotFoundError):
                    cached.model_detail("nope")
            assert len(listings) == 3  # each miss asks the server again
            sim.configure(models=[{"name": CHAT_MODEL, "max_model_len": 4096}])
            assert cached.model_detail(CHAT_MODEL).context_window == 32768  # still cached (24 h)
        http.close()

    def test_an_expired_or_failed_model_detail_asks_again(self, sim: Any) -> None:
        instance = InstanceSettings(name="sim", base_url=sim.url)
        with VllmClient(instance, model_cache_ttl_s=0.0) as uncached:
            assert uncached.model_detail(CHAT_MODEL).context_window == 32768
            sim.configure(models=[{"name": CHAT_MODEL, "max_model_len": 4096}])
            assert uncached.model_detail(CHAT_MODEL).context_window == 4096
        with VllmClient(instance) as cached:
            fail_next(sim, route="models", mode="status", status=500)
            with pytest.raises(ServerError):
                cached.model_detail(CHAT_MODEL)
            assert cached.model_detail(CHAT_MODEL).context_window == 4096  # the error was not cached

    def test_readiness(self, client: VllmClient, sim: Any) -> None:
        readiness = client.readiness()
        assert (readiness.ready, readiness.live, readiness.local) == (True, True, True)
        assert readiness.models == [CHAT_MODEL, EMBED_MODEL]
        sim.configure(dead=True)
        assert client.health() is False
        dead = client.readiness()
        assert (dead.ready, dead.live, dead.health.checked) == (False, False, False)

    def test_metrics_while_a_stream_runs(self, client: VllmClient, sim: Any) -> None:
        # Streams other tests left behind are still counted by the server until it sees them closed: start alone.
        wait_until(lambda: client.metrics().running == 0, STATS_WAIT_S, "no stream running")
        sim.configure(itl_s=0.05, output_tokens=200)
        with client.stream_chat(chat_request(ignore_eos=True)) as stream:
            next(stream)
            snapshot = client.metrics()
        assert snapshot.running == 1
        assert snapshot.models[CHAT_MODEL].running == 1

    def test_probe(self, sim: Any) -> None:
        assert probe(sim.url) is True
        assert probe("http://127.0.0.1:9") is False


class TestManagement:
    def test_sleep_wake_and_caches(self, client: VllmClient) -> None:
        assert client.sleep(level=1) == {"status": "sleeping", "level": 1}
        assert client.is_sleeping() is True
        assert client.wake_up(["weights", "kv_cache"]) == {"status": "awake", "tags": ["weights", "kv_cache"]}
        assert client.wake_up() == {"status": "awake", "tags": None}
        assert client.is_sleeping() is False
        assert client.reset_prefix_cache() is True
        assert client.reset_mm_cache() is None

    def test_older_servers_empty_answers(self, client: VllmClient, sim: Any) -> None:
        sim.configure(legacy_dev_routes=True)
        assert client.sleep(level=2) == {"status": "sleeping", "level": 2}
        assert client.wake_up(["weights"]) == {"status": "awake", "tags": ["weights"]}
        assert client.wake_up() == {"status": "awake", "tags": None}
        assert client.reset_prefix_cache(reset_running_requests=True) is None

    def test_dev_mode_off(self, client: VllmClient, sim: Any) -> None:
        sim.configure(dev_mode=False)
        with pytest.raises(NotFoundError, match="VLLM_SERVER_DEV_MODE"):
            client.is_sleeping()

    def test_sleep_with_abort_ends_a_running_stream(self, client: VllmClient, sim: Any) -> None:
        sim.configure(itl_s=0.02, output_tokens=2000)
        accumulator = StreamAccumulator()
        with pytest.raises(GenerationAbortedError), client.stream_chat(chat_request(ignore_eos=True)) as stream:
            for count, chunk in enumerate(stream):
                accumulator.add(chunk)
                if count == 3:
                    client.sleep(level=1, mode="abort")
        assert accumulator.result().finish_reason is None
        client.wake_up()


class TestThinkingPayload:
    def test_default_on(self, client: VllmClient, sim: Any) -> None:
        client.chat(chat_request(reasoning_effort="high", max_thinking_tokens=9, stop_sequences=["END"]))
        body = sim.stats()["last_chat_body"]
        assert body["chat_template_kwargs"] == {"enable_thinking": True}
        assert body["stop"] == ["END"]
        assert "reasoning_effort" not in body
        assert "max_thinking_tokens" not in body

    def test_request_turns_it_off(self, client: VllmClient, sim: Any) -> None:
        collect(client, chat_request(thinking={"enabled": False}))
        body = sim.stats()["last_chat_body"]
        assert body["chat_template_kwargs"] == {"enable_thinking": False}
        assert body["stream_options"] == {"include_usage": True}

    def test_instance_default_off(self, sim: Any) -> None:
        with VllmClient(InstanceSettings(name="sim", base_url=sim.url), enable_thinking=False) as quiet:
            quiet.chat(chat_request())
            assert "chat_template_kwargs" not in sim.stats()["last_chat_body"]
            quiet.chat(chat_request(thinking={"enabled": True}))
            assert sim.stats()["last_chat_body"]["chat_template_kwargs"] == {"enable_thinking": True}

    @pytest.mark.parametrize("field", ["reasoning", "reasoning_content", "both"])
    def test_server_reasoning_fields(self, client: VllmClient, sim: Any, field: str) -> None:
        sim.configure(models=[{"name": CHAT_MODEL, "reasoning": "server"}], reasoning_field=field)
        for response in (client.chat(chat_request()), collect(client, chat_request())):
            assert response.reasoning
            assert response.content == "Hello there"

    def test_tag_reasoning_extracted_by_the_client(self, sim: Any) -> None:
        sim.configure(models=[{"name": CHAT_MODEL, "reasoning": "tags"}], itl_s=0.001)
        settings = InstanceSettings(name="sim", base_url=sim.url, reasoning_source="tags")
        with VllmClient(settings) as tags_client:
            for response in (tags_client.chat(chat_request()), collect(tags_client, chat_request())):
                assert response.reasoning
                assert response.content == "Hello there"
                assert "<think>" not in response.content


class TestApiKey:
    def test_sent_as_bearer(self, sim: Any) -> None:
        sim.configure(api_key=API_KEY)
        with VllmClient(InstanceSettings(name="sim", base_url=sim.url, api_key=API_KEY)) as keyed:
            assert keyed.list_models()
            assert sim.stats()["last_request_headers"]["authorization"] == f"Bearer {API_KEY}"
            assert collect(keyed, chat_request()).content == "Hello there"

    def test_missing_or_wrong_key(self, client: VllmClient, sim: Any) -> None:
        sim.configure(api_key=API_KEY)
        with pytest.raises(AuthenticationError, match="Unauthorized"):
            client.list_models()
        assert client.health() is True
        with VllmClient(InstanceSettings(name="sim", base_url=sim.url, api_key="wrong")) as wrong:
            with pytest.raises(AuthenticationError) as caught:
                wrong.chat(chat_request())
            assert "wrong" not in str(caught.value)


class TestFailures:
    @pytest.mark.parametrize(
        ("status", "error_class"),
        [
            (503, ServerBusyError),
            (500, ServerError),
            (400, BadRequestError),
            (404, NotFoundError),
            (401, AuthenticationError),
        ],
    )
    def test_status(self, client: VllmClient, sim: Any, status: int, error_class: type[Exception]) -> None:
        fail_next(sim, route="chat", mode="status", status=status, message=f"injected {status}")
        with pytest.raises(error_class, match=f"injected {status}") as caught:
            client.chat(chat_request())
        assert is_retryable(caught.value) == (status >= 500)
        assert client.chat(chat_request()).content == "Hello there"

    def test_status_on_a_stream(self, client: VllmClient, sim: Any) -> None:
        fail_next(sim, route="chat", mode="status", status=503)
        with pytest.raises(ServerBusyError):
            client.stream_chat(chat_request())

    def test_engine_queue_full(self, client: VllmClient, sim: Any) -> None:
        sim.configure(max_running=1, max_queued=1, itl_s=0.05, output_tokens=100)
        with (
            client.stream_chat(chat_request(ignore_eos=True)) as running,
            client.stream_chat(chat_request(ignore_eos=True)),
        ):
            next(running)
            wait_for(sim, lambda stats: stats["waiting"] == 1)
            with pytest.raises(ServerBusyError, match="busy"):
                client.chat(chat_request())

    def test_error_frame(self, client: VllmClient, sim: Any) -> None:
        fail_next(sim, route="chat", mode="error_frame", status=500, after_chunks=2, message="engine fell over")
        with pytest.raises(StreamErrorFrame, match="engine fell over") as caught:
            collect(client, chat_request())
        assert caught.value.status_code == 500
        assert is_retryable(caught.value)

    def test_dropped_stream(self, client: VllmClient, sim: Any) -> None:
        fail_next(sim, route="chat", mode="drop", after_chunks=2)
        with pytest.raises(StreamInterruptedError) as caught:
            collect(client, chat_request())
        assert is_retryable(caught.value)
        assert collect(client, chat_request()).content == "Hello there"

    def test_dropped_request(self, client: VllmClient, sim: Any) -> None:
        fail_next(sim, route="chat", mode="drop")
        with pytest.raises(ProviderConnectionError):
            client.chat(chat_request())

    @pytest.mark.parametrize("streamed", [False, True])
    def test_hang_times_out_within_the_deadline(self, client: VllmClient, sim: Any, streamed: bool) -> None:
        fail_next(sim, route="chat", mode="hang", hang_s=HANG_S)
        call = collect if streamed else VllmClient.chat
        started = time.monotonic()
        with pytest.raises(ProviderTimeoutError):
            call(client, chat_request(), timeout_s=0.5)
        assert time.monotonic() - started < HANG_S / 3, "it waited for the hang, not its deadline"
        wait_for(sim, lambda stats: stats["in_flight"] == 0 and stats["aborted"] == 1)

    def test_embeddings_hang(self, client: VllmClient, sim: Any) -> None:
        fail_next(sim, route="embeddings", mode="hang", hang_s=HANG_S)
        started = time.monotonic()
        with pytest.raises(ProviderTimeoutError):
            client.embed(EmbedRequest(model=EMBED_MODEL, input="x"), timeout_s=0.3)
        assert time.monotonic() - started < HANG_S / 3, "it waited for the hang, not its deadline"
        wait_for(sim, lambda stats: stats["in_flight"] == 0 and stats["aborted"] == 1)

    def test_a_stream_stalled_mid_way_is_cut_at_its_deadline(self, client: VllmClient, sim: Any) -> None:
        sim.configure(itl_s=0.8, output_tokens=50)
        started = time.monotonic()
        with pytest.raises(ProviderTimeoutError, match="deadline"):
            collect(client, chat_request(ignore_eos=True), timeout_s=1.0)
        elapsed = time.monotonic() - started
        assert 0.95 < elapsed < 20, "cut at its deadline, not before, and long before its 40 s end"
        wait_for(sim, lambda stats: stats["in_flight"] == 0 and stats["aborted"] == 1)

    def test_nothing_listening(self) -> None:
        with VllmClient(InstanceSettings(name="gone", base_url="http://127.0.0.1:9")) as gone:
            with pytest.raises(ProviderConnectionError):
                gone.chat(chat_request(), timeout_s=2)
            with pytest.raises(ProviderConnectionError):
                gone.health(timeout_s=2)


class TestCancellation:
    def test_closing_a_stream_early_aborts_the_request(self, client: VllmClient, sim: Any) -> None:
        sim.configure(itl_s=0.02, output_tokens=1000)
        with client.stream_chat(chat_request(ignore_eos=True)) as stream:
            for _ in range(3):
                next(stream)
            assert sim.stats()["in_flight"] == 1
        stats = wait_for(sim, lambda stats: stats["in_flight"] == 0)
        assert (stats["aborted"], stats["completed"]) == (1, 0)

    def test_closing_from_another_thread(self, client: VllmClient, sim: Any) -> None:
        sim.configure(itl_s=2.0, output_tokens=10)
        stream = client.stream_chat(chat_request(ignore_eos=True))
        next(stream)
        closer = threading.Timer(0.2, stream.close)
        closer.start()
        started = time.monotonic()
        chunks = list(stream)
        assert time.monotonic() - started < 9, "closed long before its remaining 18 s of tokens"
        assert stream.closed
        assert all(chunk.finish_reason is None for chunk in chunks)
        closer.join()
        wait_for(sim, lambda stats: stats["in_flight"] == 0 and stats["aborted"] == 1)

    def test_a_finished_stream_reuses_its_connection(self, sim: Any) -> None:
        connects: list[str] = []
        http = httpx.Client(event_hooks={"request": [counting_connects(connects)]})
        with http, VllmClient(InstanceSettings(name="sim", base_url=sim.url), http=http) as traced:
            for _ in range(3):
                assert collect(traced, chat_request()).finish_reason == "stop"
        assert len(connects) == 1
        stats = wait_for(sim, lambda stats: stats["in_flight"] == 0 and stats["completed"] == 3)
        assert stats["aborted"] == 0

    def test_many_streams_in_parallel(self, client: VllmClient, sim: Any) -> None:
        sim.configure(itl_s=0.01)
        results: list[str | None] = []
        connects: list[str] = []
        (pool,) = client._pools.clients
        pool.event_hooks = {"request": [counting_connects(connects)]}

        def run() -> None:
            results.append(collect(client, chat_request()).content)

        threads = [threading.Thread(target=run) for _ in range(16)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert results == ["Hello there"] * 16
        stats = wait_for(sim, lambda stats: stats["in_flight"] == 0)  # the last [DONE] is sent before it is counted
        assert stats["completed"] == 16
        assert stats["max_in_flight_seen"] > 1  # they did overlap
        assert 1 < len(connects) <= 8 + 4  # the pool never opened more connections than the instance allows
