"""The one path every request to a vLLM server takes: pooled connections, auth headers, deadline-bounded
timeouts, the error boundary, and typed JSON fields."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any, Self, TypeVar

import httpx
from pydantic import SecretStr

from provider.settings import (
    MODEL_DETAIL_CACHE_TTL_S,
    InstanceSettings,
    Timeouts,
)
from provider.vllm.boundary import Deadline, ErrorBoundary
from provider.vllm.chat_stream import DeadlineWatchdog
from provider.vllm.errors import (
    InvalidResponseError,
    ProviderConfigurationError,
)
from provider.vllm.models import (
    ModelInfo,
)
from provider.vllm.pools import ConnectionPools

__all__ = ["InstanceHttp"]

logger = logging.getLogger("provider.vllm.client")

_Parsed = TypeVar("_Parsed")

# Connections beyond the instance's concurrency, for health, metrics and management calls beside full load.
MANAGEMENT_CONNECTIONS = 4
# Below uvicorn's 5 s keep-alive (vLLM's default): never reuse a connection the server is closing.
KEEPALIVE_EXPIRY_S = 4.0


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


class InstanceHttp:
    """The HTTP half of a client for one vLLM server: pools, headers, deadlines, the error boundary, JSON."""

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
        self._boundary = ErrorBoundary(self.name, api_key)
        self._pools = (
            ConnectionPools.wrapping(http)
            if http is not None
            else ConnectionPools.sized(
                instance.concurrency + MANAGEMENT_CONNECTIONS,
                KEEPALIVE_EXPIRY_S,
                httpx.Timeout(self._timeouts.management_s, connect=self._timeouts.connect_s),
            )
        )
        self._watchdog = DeadlineWatchdog(self.name)
        self._model_cache: dict[str, tuple[float, ModelInfo]] = {}
        self._model_cache_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(instance={self.name!r}, base_url={self._base_url!r})"

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
        deadline: Deadline,
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

    def _deadline(self, timeout_s: float | None, default_s: float) -> Deadline:
        """The caller's deadline, or the operation's default one."""
        return Deadline(default_s if timeout_s is None else timeout_s)

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
