"""The synchronous vLLM client: one HTTP connection pool per instance, typed answers, typed errors.

Every request goes through ``InstanceHttp`` (``transport``) and its ``ErrorBoundary`` (``boundary``), the one
place where httpx's exceptions and vLLM's error statuses become ``ProviderError`` subclasses. Deadlines: each
call takes ``timeout_s``, the time left of the caller's deadline, and bounds every HTTP timeout by it; a stream
(``chat_stream``) also checks it between chunks, and a watchdog thread cuts the socket of a stream that stalls
past it. The api key is sent as ``Authorization: Bearer`` and never appears in a log record, a repr or an error
message.
"""

from __future__ import annotations

import time
from typing import Any, Literal

import httpx

from provider.settings import (
    LOCALHOST_PROBE_TIMEOUT_S,
    normalize_base_url,
)
from provider.vllm.boundary import HTTPX_ERRORS
from provider.vllm.chat_stream import CHAT_PATH, ChatStream
from provider.vllm.errors import (
    NotFoundError,
    ProviderError,
)
from provider.vllm.metrics import parse_metrics
from provider.vllm.models import (
    ChatRequest,
    ChatResponse,
    CompletionResponse,
    EmbeddingResponse,
    EmbedRequest,
    HealthCheck,
    MetricsSnapshot,
    ModelInfo,
    Readiness,
    TokenizeResult,
    parse_chat_response,
    parse_completion_response,
    parse_embedding_response,
    parse_model_list,
    parse_tokenize_result,
)
from provider.vllm.streaming import ABORT_FINISH_REASON, StreamDecoder, aborted
from provider.vllm.thinking import build_chat_payload, make_splitter, sent_thinking, split_reasoning
from provider.vllm.transport import InstanceHttp

__all__ = ["ENDPOINTS", "HTTPX_ERRORS", "ChatStream", "VllmClient", "probe"]

ENDPOINTS: dict[str, str] = {
    "health": "/health",
    "models": "/v1/models",
    "chat": CHAT_PATH,
    "completions": "/v1/completions",
    "embeddings": "/v1/embeddings",
    "tokenize": "/tokenize",
    "detokenize": "/detokenize",
    "metrics": "/metrics",
    "version": "/version",
    "load": "/load",
}


def _flag(value: bool) -> str:
    return "true" if value else "false"


class VllmClient(InstanceHttp):
    """A thread-safe client for one vLLM server: generation, state, discovery and management routes."""

    # -- generation -------------------------------------------------------------------------------------

    def chat(self, request: ChatRequest, *, timeout_s: float | None = None) -> ChatResponse:
        """One non-streamed chat completion, reasoning apart from content; an answer vLLM aborted
        (``finish_reason: "abort"``) raises ``GenerationAbortedError`` (retryable)."""
        payload = build_chat_payload(request, enable_thinking_default=self._enable_thinking)
        body = self._call("POST", CHAT_PATH, timeout_s=timeout_s, default_s=self._timeouts.chat_s, json_body=payload)
        response = self._parse(parse_chat_response, body)
        if response.finish_reason == ABORT_FINISH_REASON:
            tokens = response.usage.completion_tokens if response.usage else 0
            raise aborted(f"{tokens} tokens", instance=self.name)
        source = self.instance.reasoning_source
        if source == "server":
            return response
        content, reasoning = split_reasoning(response.content, response.reasoning, source, sent_thinking(payload))
        return response.model_copy(update={"content": content, "reasoning": reasoning})

    def stream_chat(self, request: ChatRequest, *, timeout_s: float | None = None) -> ChatStream:
        """Open a chat stream (usage included); use it as a context manager so it always closes."""
        payload = build_chat_payload(request, enable_thinking_default=self._enable_thinking, stream=True)
        deadline = self._deadline(timeout_s, self._timeouts.stream_s)
        response = self._send("POST", CHAT_PATH, deadline, json_body=payload, stream=True)
        splitter = make_splitter(self.instance.reasoning_source, sent_thinking(payload))
        return ChatStream(
            response,
            decoder=StreamDecoder(splitter=splitter, instance=self.name),
            deadline=deadline,
            boundary=self._boundary,
            watchdog=self._watchdog,
        )

    def complete(
        self,
        model: str,
        prompt: str,
        *,
        max_tokens: int | None = None,
        temperature: float | None = None,
        stop: str | list[str] | None = None,
        extra_body: dict[str, Any] | None = None,
        timeout_s: float | None = None,
    ) -> CompletionResponse:
        """One plain (non-chat) completion from ``/v1/completions``."""
        payload: dict[str, Any] = {"model": model, "prompt": prompt}
        for name, value in (("max_tokens", max_tokens), ("temperature", temperature), ("stop", stop)):
            if value is not None:
                payload[name] = value
        payload.update(extra_body or {})
        body = self._call(
            "POST", "/v1/completions", timeout_s=timeout_s, default_s=self._timeouts.chat_s, json_body=payload
        )
        return self._parse(parse_completion_response, body)

    def embed(self, request: EmbedRequest, *, timeout_s: float | None = None) -> EmbeddingResponse:
        """Vectors for one text or a batch (base64 answers decoded to floats)."""
        payload = request.model_dump(exclude_none=True)
        body = self._call(
            "POST", "/v1/embeddings", timeout_s=timeout_s, default_s=self._timeouts.embed_s, json_body=payload
        )
        return self._parse(parse_embedding_response, body)

    # -- state and discovery ----------------------------------------------------------------------------

    def health(self, *, timeout_s: float | None = None) -> bool:
        """Liveness: ``True`` on 200, ``False`` on a 5xx (dead engine); an unreachable server raises."""
        deadline = self._deadline(timeout_s, self._timeouts.management_s)
        response = self._send("GET", "/health", deadline, check_status=False)
        if response.status_code >= 500:
            return False
        if response.status_code >= 400:
            raise self._boundary.status_error(response, "GET /health", "/health")
        return True

    def readiness(self, *, timeout_s: float | None = None) -> Readiness:
        """Live and ready (``/v1/models`` lists models), never raising: errors land in ``health.error``."""
        deadline = self._deadline(timeout_s, self._timeouts.management_s)
        facts: dict[str, Any] = {
            "instance": self.name,
            "configured": self.instance.usable,
            "local": self.instance.resolved_tier == "local",
            "base_url": self._base_url,
            "endpoints": dict(ENDPOINTS),
        }
        try:
            live = self.health(timeout_s=deadline.remaining_s())
        except ProviderError as exc:
            return Readiness(**facts, ready=False, live=False, health=HealthCheck(error=str(exc)))
        if not live:
            return Readiness(
                **facts,
                ready=False,
                live=False,
                health=HealthCheck(error="/health answered with a 5xx status"),
            )
        try:
            models = self.list_models(timeout_s=deadline.remaining_s())
        except ProviderError as exc:
            return Readiness(**facts, ready=False, live=True, health=HealthCheck(checked=True, error=str(exc)))
        names = [model.id for model in models]
        return Readiness(
            **facts,
            ready=bool(names),
            live=True,
            models=names,
            health=HealthCheck(checked=True, ok=bool(names), error=None if names else "/v1/models lists no model"),
        )

    def version(self, *, timeout_s: float | None = None) -> str:
        """The server's vLLM version."""
        body = self._call("GET", "/version", timeout_s=timeout_s)
        return self._field(body, "version", str, "GET /version")

    def load(self, *, timeout_s: float | None = None) -> int:
        """The server's own load figure (0 unless it tracks load)."""
        body = self._call("GET", "/load", timeout_s=timeout_s)
        return self._field(body, "server_load", int, "GET /load")

    def list_models(self, *, timeout_s: float | None = None) -> list[ModelInfo]:
        """Every served model name; refreshes the model detail cache."""
        body = self._call("GET", "/v1/models", timeout_s=timeout_s)
        models = self._parse(parse_model_list, body)
        expires_at = time.monotonic() + self._model_cache_ttl_s
        with self._model_cache_lock:
            self._model_cache = {model.id: (expires_at, model) for model in models}
        return models

    def model_detail(self, model: str, *, timeout_s: float | None = None) -> ModelInfo:
        """One model's detail, cached; a model the server does not list raises ``NotFoundError``."""
        with self._model_cache_lock:
            cached = self._model_cache.get(model)
        if cached is not None and cached[0] > time.monotonic():
            return cached[1]
        for info in self.list_models(timeout_s=timeout_s):
            if info.id == model:
                return info
        raise NotFoundError(
            f"The model `{model}` is not served by {self.name}",
            status_code=404,
            param="model",
            instance=self.name,
        )

    def tokenize(
        self,
        model: str,
        prompt: str | None = None,
        messages: list[dict[str, Any]] | None = None,
        *,
        timeout_s: float | None = None,
    ) -> TokenizeResult:
        """Token ids of a prompt, or of chat messages rendered as ``chat`` would render them."""
        if (prompt is None) == (messages is None):
            raise ValueError("tokenize takes exactly one of prompt or messages")
        payload: dict[str, Any] = {"model": model}
        if messages is not None:
            payload["messages"] = messages
            payload["add_generation_prompt"] = True
            if self._enable_thinking:
                payload["chat_template_kwargs"] = {"enable_thinking": True}
        else:
            payload["prompt"] = prompt
        body = self._call("POST", "/tokenize", timeout_s=timeout_s, json_body=payload)
        return self._parse(parse_tokenize_result, body)

    def detokenize(self, model: str, tokens: list[int], *, timeout_s: float | None = None) -> str:
        """The text of token ids."""
        body = self._call("POST", "/detokenize", timeout_s=timeout_s, json_body={"model": model, "tokens": tokens})
        return self._field(body, "prompt", str, "POST /detokenize")

    def metrics(self, *, timeout_s: float | None = None) -> MetricsSnapshot:
        """Running and waiting requests, KV-cache usage and token counters from ``/metrics``."""
        deadline = self._deadline(timeout_s, self._timeouts.management_s)
        response = self._send("GET", "/metrics", deadline)
        return self._parse(parse_metrics, response.text)

    # -- management (dev-mode routes) -------------------------------------------------------------------

    def reset_prefix_cache(
        self,
        reset_running_requests: bool = False,
        reset_external: bool = False,
        *,
        timeout_s: float | None = None,
    ) -> bool | None:
        """Drop the prefix cache; ``None`` from servers that answer with an empty body (0.11 to 0.16)."""
        params = {
            "reset_running_requests": _flag(reset_running_requests),
            "reset_external": _flag(reset_external),
        }
        body = self._call("POST", "/reset_prefix_cache", timeout_s=timeout_s, params=params)
        if body is None:
            return None
        return self._field(body, "success", bool, "POST /reset_prefix_cache")

    def reset_mm_cache(self, *, timeout_s: float | None = None) -> None:
        """Drop the multimodal cache."""
        self._call("POST", "/reset_mm_cache", timeout_s=timeout_s)

    def sleep(
        self,
        level: int = 1,
        mode: Literal["abort", "wait", "keep"] | None = None,
        *,
        timeout_s: float | None = None,
    ) -> dict[str, Any]:
        """Put the engine to sleep (level 1 offloads weights, 2 drops them); ``mode=abort`` ends work."""
        params: dict[str, Any] = {"level": level}
        if mode is not None:
            params["mode"] = mode
        body = self._call("POST", "/sleep", timeout_s=timeout_s, params=params)
        if body is None:
            return {"status": "sleeping", "level": level}
        status = self._field(body, "status", str, "POST /sleep")
        return {"status": status, "level": body.get("level", level)}

    def wake_up(self, tags: list[str] | None = None, *, timeout_s: float | None = None) -> dict[str, Any]:
        """Wake the engine (only the given parts, e.g. ``["weights"]``, or all of it)."""
        params = [("tags", tag) for tag in tags or []]
        body = self._call("POST", "/wake_up", timeout_s=timeout_s, params=params)
        if body is None:
            return {"status": "awake", "tags": list(tags) if tags else None}
        status = self._field(body, "status", str, "POST /wake_up")
        return {"status": status, "tags": body.get("tags")}

    def is_sleeping(self, *, timeout_s: float | None = None) -> bool:
        """Whether the engine sleeps."""
        body = self._call("GET", "/is_sleeping", timeout_s=timeout_s)
        return self._field(body, "is_sleeping", bool, "GET /is_sleeping")


def probe(url: str, timeout_s: float = LOCALHOST_PROBE_TIMEOUT_S, *, http: httpx.Client | None = None) -> bool:
    """Whether a vLLM answers at ``url`` in time (``/health``, else ``/v1/models``); never raises."""
    base_url = normalize_base_url(url)
    client = http or httpx.Client(timeout=timeout_s)
    try:
        for path in ("/health", "/v1/models"):
            try:
                if client.get(base_url + path, timeout=timeout_s).status_code == 200:
                    return True
            except HTTPX_ERRORS:
                continue
        return False
    finally:
        if http is None:
            client.close()
