"""The provider's errors: one root, mapped from httpx at one boundary (``provider.vllm.client``).

    ProviderError
    ├── ProviderConfigurationError        bad or missing settings (no URL, unknown instance)
    ├── ProviderConnectionError           connect/read failure before an answer        retryable
    ├── ProviderTimeoutError              the deadline or an HTTP timeout ran out      retryable
    ├── StreamInterruptedError            the server dropped a stream mid-way          retryable
    ├── StreamErrorFrame                  ``data: {"error": ...}`` inside a 200 stream (retryable when its code is)
    ├── GenerationAbortedError            vLLM ended the generation itself (``finish_reason: "abort"``) retryable
    ├── InvalidResponseError              a body that is not what vLLM sends
    ├── UnsupportedCapabilityError        the model or server cannot do what was asked
    └── ProviderStatusError               an HTTP error status, vLLM's message kept
        ├── BadRequestError               400 (validation, context too long, ...)
        ├── AuthenticationError           401 (vLLM's ``{"error": "Unauthorized"}``)
        ├── NotFoundError                 404 (unknown model, route the model cannot serve)
        ├── ServerBusyError               503 ("The engine is currently busy")          retryable
        └── ServerError                   other 5xx                                      retryable

``is_retryable`` is the one place that decides what is worth another try.
"""

from __future__ import annotations

__all__ = [
    "AuthenticationError",
    "BadRequestError",
    "GenerationAbortedError",
    "InvalidResponseError",
    "NotFoundError",
    "ProviderConfigurationError",
    "ProviderConnectionError",
    "ProviderError",
    "ProviderStatusError",
    "ProviderTimeoutError",
    "ServerBusyError",
    "ServerError",
    "StreamErrorFrame",
    "StreamInterruptedError",
    "UnsupportedCapabilityError",
    "error_for_status",
    "is_retryable",
]


class ProviderError(Exception):
    """Root of every error the vLLM provider raises."""

    code: str = "provider_error"
    retryable: bool = False

    def __init__(self, message: str, *, instance: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.instance = instance

    def __str__(self) -> str:
        return self.message


class ProviderConfigurationError(ProviderError):
    """Settings that cannot work (no base URL, unknown instance, bad key)."""

    code = "configuration_error"


class ProviderConnectionError(ProviderError):
    """The server could not be reached, or the connection broke before an answer."""

    code = "connection_error"
    retryable = True


class ProviderTimeoutError(ProviderError):
    """An HTTP timeout or the request's own deadline ran out."""

    code = "timeout"
    retryable = True


class StreamInterruptedError(ProviderError):
    """A stream ended without its final chunk and ``[DONE]``."""

    code = "stream_interrupted"
    retryable = True


class GenerationAbortedError(ProviderError):
    """vLLM ended a generation nobody asked it to end (``finish_reason: "abort"``: slept with ``mode=abort``,
    reset, shut down): the partial answer is not an answer, another try may give the whole one."""

    code = "generation_aborted"
    retryable = True


class InvalidResponseError(ProviderError):
    """The server answered with something that is not vLLM's wire format."""

    code = "invalid_response"


class UnsupportedCapabilityError(ProviderError):
    """The model or server cannot serve this operation."""

    code = "unsupported_capability"


class ProviderStatusError(ProviderError):
    """An HTTP error status; ``message`` is vLLM's own."""

    code = "http_error"

    def __init__(
        self,
        message: str,
        *,
        status_code: int,
        error_type: str | None = None,
        param: str | None = None,
        instance: str | None = None,
    ) -> None:
        super().__init__(message, instance=instance)
        self.status_code = status_code
        self.error_type = error_type
        self.param = param


class BadRequestError(ProviderStatusError):
    """400: validation failed, prompt too long, max_tokens too large."""

    code = "bad_request"


class AuthenticationError(ProviderStatusError):
    """401: the instance's api key is missing or wrong."""

    code = "unauthorized"


class NotFoundError(ProviderStatusError):
    """404: unknown model, or a route this server's model cannot serve."""

    code = "not_found"


class ServerBusyError(ProviderStatusError):
    """503: the engine's queue is full, or it is not ready."""

    code = "server_busy"
    retryable = True


class ServerError(ProviderStatusError):
    """Any other 5xx."""

    code = "server_error"
    retryable = True


class StreamErrorFrame(ProviderError):
    """An error sent inside a 200 stream (``data: {"error": {...}}``).

    One cause, one code: a frame carrying an HTTP status gets the code that status gets as an answer
    (``bad_request`` for 400, ``server_busy`` for 503, ...), so a bad request reads the same streamed or not;
    ``stream_error`` only for a frame without a status.
    """

    code = "stream_error"

    def __init__(
        self,
        message: str,
        *,
        status_code: int | None = None,
        error_type: str | None = None,
        param: str | None = None,
        instance: str | None = None,
    ) -> None:
        super().__init__(message, instance=instance)
        self.status_code = status_code
        self.error_type = error_type
        self.param = param
        self.retryable = status_code is None or status_code >= 500
        if status_code is not None and status_code >= 400:
            self.code = _status_class(status_code).code


def error_for_status(
    status_code: int,
    message: str,
    *,
    error_type: str | None = None,
    param: str | None = None,
    instance: str | None = None,
) -> ProviderStatusError:
    """The typed error for an HTTP status."""
    cls = _status_class(status_code)
    return cls(message, status_code=status_code, error_type=error_type, param=param, instance=instance)


def _status_class(status_code: int) -> type[ProviderStatusError]:
    """The error class of an HTTP error status."""
    cls: type[ProviderStatusError]
    if status_code == 400 or status_code == 422:
        cls = BadRequestError
    elif status_code in (401, 403):
        cls = AuthenticationError
    elif status_code == 404:
        cls = NotFoundError
    elif status_code == 503:
        cls = ServerBusyError
    elif status_code >= 500:
        cls = ServerError
    else:
        cls = ProviderStatusError
    return cls


def is_retryable(exc: BaseException) -> bool:
    """Whether another try at the same instance (or another one) can help."""
    if isinstance(exc, ProviderError):
        return exc.retryable
    return False
