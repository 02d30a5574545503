"""The one boundary where httpx's exceptions and vLLM's error answers become ``ProviderError``s (key redacted),
and the deadline every HTTP timeout of one call derives from."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import NoReturn

import httpx
from httpx_sse import SSEError
from pydantic import SecretStr

from provider.vllm.errors import (
    InvalidResponseError,
    ProviderConfigurationError,
    ProviderConnectionError,
    ProviderError,
    ProviderStatusError,
    ProviderTimeoutError,
    StreamInterruptedError,
    error_for_status,
)

__all__ = ["HTTPX_ERRORS", "Deadline", "ErrorBoundary"]

_DEV_ROUTES = frozenset({"/sleep", "/wake_up", "/is_sleeping", "/reset_prefix_cache", "/reset_mm_cache"})
_DEV_MODE_HINT = " (management routes need VLLM_SERVER_DEV_MODE=1 on the server)"
# Everything httpx and httpx-sse raise while sending a request or reading its answer.
HTTPX_ERRORS = (httpx.HTTPError, httpx.InvalidURL, SSEError)


class Deadline:
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


class ErrorBoundary:
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
