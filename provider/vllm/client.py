"""The synchronous vLLM client: one HTTP connection pool per instance, typed answers, typed errors.

Every request goes through ``_ErrorBoundary``, the one place where httpx's exceptions and vLLM's error
statuses become ``ProviderError`` subclasses. Deadlines: each call takes ``timeout_s``, the time left of the
caller's deadline, and bounds every HTTP timeout by it; a stream also checks it between chunks, and a
watchdog thread cuts the socket of a stream that stalls past it. The api key is sent as
``Authorization: Bearer`` and never appears in a log record, a repr or an error message.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import socket
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from types import TracebackType
from typing import Any, Literal, NoReturn, Self, TypeVar

import httpx
from httpx_sse import EventSource, SSEError
from pydantic import SecretStr

from provider.settings import (
    LOCALHOST_PROBE_TIMEOUT_S,
    MODEL_DETAIL_CACHE_TTL_S,
    InstanceSettings,
    Settings,
    Timeouts,
    normalize_base_url,
)
from provider.vllm.errors import (
    InvalidResponseError,
    NotFoundError,
    ProviderConfigurationError,
    ProviderConnectionError,
    ProviderError,
    ProviderStatusError,
    ProviderTimeoutError,
    StreamInterruptedError,
    error_for_status,
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
    StreamChunk,
    TokenizeResult,
    parse_chat_response,
    parse_completion_response,
    parse_embedding_response,
    parse_model_list,
    parse_tokenize_result,
)
from provider.vllm.pools import ConnectionPools
from provider.vllm.streaming import ABORT_FINISH_REASON, StreamDecoder, aborted
from provider.vllm.thinking import build_chat_payload, make_splitter, sent_thinking, split_reasoning

__all__ = ["ENDPOINTS", "HTTPX_ERRORS", "ChatStream", "VllmClient", "probe"]

logger = logging.getLogger(__name__)

_Parsed = TypeVar("_Parsed")

# Connections beyond the instance's concurrency, for health, metrics and management calls beside full load.
MANAGEMENT_CONNECTIONS = 4
# Below uvicorn's 5 s keep-alive (vLLM's default): never reuse a connection the server is closing.
KEEPALIVE_EXPIRY_S = 4.0

CHAT_PATH = "/v1/chat/completions"
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
_DEV_ROUTES = frozenset({"/sleep", "/wake_up", "/is_sleeping", "/reset_prefix_cache", "/reset_mm_cache"})
_DEV_MODE_HINT = " (management routes need VLLM_SERVER_DEV_MODE=1 on the server)"
# Everything httpx and httpx-sse raise while sending a request or reading its answer.
HTTPX_ERRORS = (httpx.HTTPError, httpx.InvalidURL, SSEError)
# A watchdog with nothing to watch for this long ends its thread (the next stream starts another).
WATCHDOG_IDLE_EXIT_S = 60.0


class _Deadline:
    """A point on the monotonic clock that every HTTP timeout of one call is derived from."""

    __slots__ = ("at", "timeout_s")

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self.at = time.monotonic() + timeout_s

    def remaining_s(self) -> float:
        return self.at - time.monotonic()

    def http_timeout(self, connect_s: float, route: str, instance: str) -> httpx.Timeout:
        """httpx timeouts bounded by the time left; none left means the call is not made."""
        remaining_s = self.remaining_s()
        if remaining_s <= 0:
            raise ProviderTimeoutError(f"{route} on {instance}: the deadline had passed", instance=instance)
        return httpx.Timeout(remaining_s, connect=min(connect_s, remaining_s))


class _ErrorBoundary:
    """Turns httpx exceptions and vLLM error answers into ``ProviderError``s, with the api key redacted."""

    def __init__(self, instance: str, api_key: SecretStr | None) -> None:
        self.instance = instance
        self._api_key = api_key

    def redact(self, text: str) -> str:
        """The text with the api key, should it appear, replaced."""
        secret = self._api_key.get_secret_value() if self._api_key else ""
        return text.replace(secret, "**********") if secret and secret in text else text

    @contextmanager
    def guard(self, route: str) -> Iterator[None]:
        """Map every httpx error raised inside the block (before the answer is read)."""
        try:
            yield
        except HTTPX_ERRORS as exc:
            self.raise_transport_error(exc, route, in_stream=False)

    def raise_transport_error(self, exc: Exception, route: str, *, in_stream: bool) -> NoReturn:
        """Raise the mapped error, chained to ``exc`` unless the exception's own text carries the api key."""
        error = self.transport_error(exc, route, in_stream=in_stream)
        if self.redact(str(exc)) != str(exc):
            raise error from None
        raise error from exc

    def transport_error(self, exc: Exception, route: str, *, in_stream: bool) -> ProviderError:
        """The provider error for an httpx exception, before the answer or in the middle of a stream."""
        kind: type[ProviderError]
        if isinstance(exc, httpx.TimeoutException):
            kind, what = ProviderTimeoutError, "timed out"
        elif isinstance(exc, httpx.UnsupportedProtocol | httpx.LocalProtocolError | httpx.InvalidURL):
            kind, what = ProviderConfigurationError, "the request cannot be sent"
        elif isinstance(exc, httpx.DecodingError | httpx.TooManyRedirects | SSEError):
            kind, what = InvalidResponseError, "the answer is not vLLM's"
        elif in_stream:
            kind, what = StreamInterruptedError, "the stream broke"
        else:
            kind, what = ProviderConnectionError, "connection failed"
        detail = self.redact(str(exc)) or type(exc).__name__
        return kind(f"{route} on {self.instance}: {what} ({detail})", instance=self.instance)

    def status_error(self, response: httpx.Response, route: str, path: str) -> ProviderStatusError:
        """The typed error for a status of 400 or more, keeping vLLM's message, type and param."""
        message, error_type, param = _error_fields(response)
        if error_type is None:
            # Not vLLM's error shape ({"detail": ...}, {"error": "Unauthorized"}, a proxy page): say where.
            message = f"{message} ({route})" if message else f"HTTP {response.status_code} ({route})"
        if path in _DEV_ROUTES and response.status_code == 404:
            message += _DEV_MODE_HINT
        return error_for_status(
            response.status_code,
            self.redact(message),
            error_type=error_type,
            param=param,
            instance=self.instance,
        )


def _error_fields(response: httpx.Response) -> tuple[str, str | None, str | None]:
    """``(message, type, param)`` of ``{"error": {...}}``, ``{"error": "..."}`` or ``{"detail": ...}``."""
    try:
        body = response.json()
    except ValueError:
        return response.text.strip()[:500] or response.reason_phrase, None, None
    if not isinstance(body, dict):
        return str(body)[:500], None, None
    error = body.get("error")
    if isinstance(error, dict):
        param = error.get("param")
        return str(error.get("message") or ""), error.get("type"), None if param is None else str(param)
    if isinstance(error, str):
        return error, None, None
    detail = body.get("detail")
    if isinstance(detail, list):
        return (
            "; ".join(str(item.get("msg", item)) if isinstance(item, dict) else str(item) for item in detail),
            None,
            None,
        )
    if detail is not None:
        return str(detail), None, None
    if "message" in body:
        return str(body["message"]), body.get("type"), None
    return response.text.strip()[:500], None, None


def _socket_of(response: httpx.Response) -> socket.socket | None:
    """The socket under a streamed response, when there is a real one."""
    network_stream = response.extensions.get("network_stream")
    if network_stream is None:
        return None
    sock = network_stream.get_extra_info("socket")
    return sock if isinstance(sock, socket.socket) else None


class _DeadlineWatchdog:
    """One daemon thread per client that cuts any stream still open past its deadline."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._condition = threading.Condition()
        self._heap: list[tuple[float, int, weakref.ref[ChatStream]]] = []
        self._order = itertools.count()
        self._thread: threading.Thread | None = None
        self._stopped = False

    def watch(self, at: float, stream: ChatStream) -> None:
        """Expire ``stream`` at monotonic time ``at`` unless it is finished by then."""
        with self._condition:
            if self._stopped:
                return
            entry = (at, next(self._order), weakref.ref(stream))
            heapq.heappush(self._heap, entry)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=f"vllm-deadlines-{self._name}", daemon=True)
                self._thread.start()
            elif self._heap[0] is entry:
                self._condition.notify()

    def stop(self) -> None:
        """Forget every stream and end the thread."""
        with self._condition:
            self._stopped = True
            self._heap.clear()
            self._condition.notify()

    def _run(self) -> None:
        while True:
            with self._condition:
                while not self._stopped:
                    if not self._heap:
                        if not self._condition.wait(WATCHDOG_IDLE_EXIT_S) and not self._heap:
                            self._thread = None
                            return
                        continue
                    wait_s = self._heap[0][0] - time.monotonic()
                    if wait_s <= 0:
                        break
                    self._condition.wait(wait_s)
                if self._stopped:
                    return
                _, _, stream_ref = heapq.heappop(self._heap)
            stream = stream_ref()
            if stream is not None:
                stream._expire()


class ChatStream:
    """An open chat stream, iterated for ``StreamChunk``s; ``close()`` drops the connection: vLLM aborts."""

    def __init__(
        self,
        response: httpx.Response,
        *,
        decoder: StreamDecoder,
        deadline: _Deadline,
        boundary: _ErrorBoundary,
        watchdog: _DeadlineWatchdog,
    ) -> None:
        self._response = response
        self._decoder = decoder
        self._deadline = deadline
        self._boundary = boundary
        self._route = f"POST {CHAT_PATH}"
        self._lock = threading.Lock()
        # Once finished, the connection may go back to the pool: the socket is no longer ours to cut.
        self._finished = False
        self._closed = False
        self._expired = False
        self._socket = _socket_of(response)
        self._chunks = self._read()
        if self._socket is not None:
            watchdog.watch(deadline.at, self)

    def __iter__(self) -> Iterator[StreamChunk]:
        return self

    def __next__(self) -> StreamChunk:
        return next(self._chunks)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<ChatStream {self._boundary.instance} {state} chunks={self._decoder.chunks}>"

    @property
    def closed(self) -> bool:
        """Whether the stream was closed, by the caller or at its end."""
        return self._closed

    def close(self) -> None:
        """Drop the connection now (vLLM aborts the request); safe to call twice and from another thread."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if not self._finished:
                self._finished = True
                self._cut_socket()
        self._response.close()

    def _expire(self) -> None:
        """Called by the watchdog at the deadline: wake a reader blocked on a stalled server."""
        with self._lock:
            if self._finished or self._response.is_closed:
                return
            self._expired = True
            self._cut_socket()

    def _cut_socket(self) -> None:
        """Shut the socket down, waking a blocked read (``socket.socket``'s method: TLS sockets too)."""
        if self._socket is not None:
            with suppress(OSError):
                socket.socket.shutdown(self._socket, socket.SHUT_RDWR)

    def _timeout_error(self) -> ProviderTimeoutError:
        return ProviderTimeoutError(
            f"{self._route} on {self._boundary.instance}: the stream passed its deadline of "
            f"{self._deadline.timeout_s:g} s after {self._decoder.chunks} chunks",
            instance=self._boundary.instance,
        )

    def _read(self) -> Iterator[StreamChunk]:
        try:
            events = EventSource(self._response).iter_sse()
            for event in events:
                if self._closed:
                    return
                if time.monotonic() >= self._deadline.at:
                    raise self._timeout_error()
                chunk = self._decoder.feed(event.data)
                if self._decoder.done:
                    self._drain(events)
                    if chunk is not None:
                        yield chunk
                    return
                if chunk is not None:
                    yield chunk
            if self._expired:
                raise self._timeout_error()
            self._decoder.finish()
        except HTTPX_ERRORS as exc:
            if self._closed:
                return
            if self._expired:
                raise self._timeout_error() from exc
            self._boundary.raise_transport_error(exc, self._route, in_stream=True)
        finally:
            self.close()

    def _drain(self, events: Iterator[Any]) -> None:
        """After ``[DONE]``: read the body's end so the connection returns to the pool."""
        with self._lock:
            self._finished = True
        try:
            for _ in events:
                pass
        except HTTPX_ERRORS:
            logger.debug("%s: the connection broke after [DONE]", self._boundary.instance)


def _flag(value: bool) -> str:
    return "true" if value else "false"


def _api_key_of(instance: InstanceSettings) -> SecretStr | None:
    """The instance's api key, refused when an HTTP header could not carry it."""
    if instance.api_key is None or not instance.api_key.get_secret_value():
        return None
    secret = instance.api_key.get_secret_value()
    if not secret.isascii() or not secret.isprintable() or any(char.isspace() for char in secret):
        raise ProviderConfigurationError(
            f"the api key of instance {instance.name!r} has characters an HTTP header cannot carry",
            instance=instance.name or None,
        )
    return instance.api_key


class VllmClient:
    """A thread-safe client for one vLLM server."""

    def __init__(
        self,
        instance: InstanceSettings,
        *,
        http: httpx.Client | None = None,
        enable_thinking: bool = True,
        model_cache_ttl_s: float = MODEL_DETAIL_CACHE_TTL_S,
        timeouts: Timeouts | None = None,
    ) -> None:
        self.instance = instance
        self.name = instance.name or instance.base_url or "vllm"
        self._base_url = instance.base_url
        self._enable_thinking = enable_thinking
        self._model_cache_ttl_s = model_cache_ttl_s
        self._timeouts = timeouts or Timeouts()
        api_key = _api_key_of(instance)
        self._headers = httpx.Headers({"Authorization": f"Bearer {api_key.get_secret_value()}"} if api_key else {})
        self._stream_headers = httpx.Headers(
            {**self._headers, "Accept": "text/event-stream", "Cache-Control": "no-store"}
        )
        self._boundary = _ErrorBoundary(self.name, api_key)
        self._pools = (
            ConnectionPools.wrapping(http)
            if http is not None
            else ConnectionPools.sized(
                instance.concurrency + MANAGEMENT_CONNECTIONS,
                KEEPALIVE_EXPIRY_S,
                httpx.Timeout(self._timeouts.management_s, connect=self._timeouts.connect_s),
            )
        )
        self._watchdog = _DeadlineWatchdog(self.name)
        self._model_cache: dict[str, tuple[float, ModelInfo]] = {}
        self._model_cache_lock = threading.Lock()

    @classmethod
    def from_settings(
        cls, instance: InstanceSettings, settings: Settings, *, http: httpx.Client | None = None
    ) -> VllmClient:
        """A client with the fleet's thinking default, model cache lifetime and timeouts for this instance."""
        return cls(
            instance,
            http=http,
            enable_thinking=settings.thinking_default(instance),
            model_cache_ttl_s=settings.model_cache_ttl_s,
            timeouts=settings.timeouts,
        )

    def __repr__(self) -> str:
        return f"VllmClient(instance={self.name!r}, base_url={self._base_url!r})"

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Stop the deadline watchdog and close the connection pool (when the client created it)."""
        self._watchdog.stop()
        self._pools.close()

    # -- the one path every request takes ---------------------------------------------------------------

    def _send(
        self,
        method: str,
        path: str,
        deadline: _Deadline,
        *,
        json_body: Any = None,
        params: Any = None,
        stream: bool = False,
        check_status: bool = True,
    ) -> httpx.Response:
        """Send one request within the deadline; error statuses raise unless ``check_status`` is off."""
        route = f"{method} {path}"
        if not self._base_url:
            raise ProviderConfigurationError(f"instance {self.name!r} has no base_url", instance=self.name)
        started = time.perf_counter()
        with self._boundary.guard(route):
            http = self._pools.pick()
            request = http.build_request(
                method,
                self._base_url + path,
                json=json_body,
                params=params,
                headers=self._stream_headers if stream else self._headers,
                timeout=deadline.http_timeout(self._timeouts.connect_s, route, self.name),
            )
            response = http.send(request, stream=stream)
            if check_status and response.status_code >= 400 and stream:
                try:
                    response.read()
                finally:
                    response.close()
        logger.debug(
            "%s %s -> %d in %.1f ms",
            self.name,
            route,
            response.status_code,
            (time.perf_counter() - started) * 1000,
        )
        if check_status and response.status_code >= 400:
            raise self._boundary.status_error(response, route, path)
        return response

    def _deadline(self, timeout_s: float | None, default_s: float) -> _Deadline:
        """The caller's deadline, or the operation's default one."""
        return _Deadline(default_s if timeout_s is None else timeout_s)

    def _json(self, response: httpx.Response, route: str) -> Any:
        """The JSON body of a 200 answer; an empty body is ``None`` (older servers' management answers)."""
        if not response.content:
            return None
        try:
            return response.json()
        except ValueError as exc:
            raise InvalidResponseError(f"{route} on {self.name}: the answer is not JSON", instance=self.name) from exc

    def _call(
        self,
        method: str,
        path: str,
        *,
        timeout_s: float | None,
        default_s: float | None = None,
        json_body: Any = None,
        params: Any = None,
    ) -> Any:
        """Send, check the status and return the JSON body."""
        deadline = self._deadline(timeout_s, self._timeouts.management_s if default_s is None else default_s)
        response = self._send(method, path, deadline, json_body=json_body, params=params)
        return self._json(response, f"{method} {path}")

    def _parse(self, parse: Callable[[Any], _Parsed], body: Any) -> _Parsed:
        """Apply a parser, naming this instance in any ``InvalidResponseError``."""
        try:
            return parse(body)
        except InvalidResponseError as exc:
            exc.instance = exc.instance or self.name
            raise

    def _field(self, body: Any, key: str, kind: type[_Parsed], route: str) -> _Parsed:
        """One typed field of a small JSON answer."""
        value = body.get(key) if isinstance(body, dict) else None
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise InvalidResponseError(
                f"{route} on {self.name}: expected {key!r} ({kind.__name__}) in the answer",
                instance=self.name,
            )
        return value

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

    def count_tokens(
        self,
        model: str,
        prompt: str | None = None,
        messages: list[dict[str, Any]] | None = None,
        *,
        timeout_s: float | None = None,
    ) -> int:
        """How many tokens a prompt or chat takes."""
        return self.tokenize(model, prompt, messages, timeout_s=timeout_s).count

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
