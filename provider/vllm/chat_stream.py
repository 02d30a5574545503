"""An open chat stream over SSE, and the watchdog thread that cuts a stream stalled past its deadline."""

from __future__ import annotations

import heapq
import itertools
import logging
import socket
import threading
import time
import weakref
from collections.abc import Iterator
from contextlib import suppress
from types import TracebackType
from typing import Any, Self

import httpx
from httpx_sse import EventSource

from provider.vllm.boundary import HTTPX_ERRORS, Deadline, ErrorBoundary
from provider.vllm.errors import (
    ProviderTimeoutError,
)
from provider.vllm.models import (
    StreamChunk,
)
from provider.vllm.streaming import StreamDecoder

__all__ = ["CHAT_PATH", "ChatStream", "DeadlineWatchdog"]

logger = logging.getLogger("provider.vllm.client")

CHAT_PATH = "/v1/chat/completions"
# A watchdog with nothing to watch for this long ends its thread (the next stream starts another).
WATCHDOG_IDLE_EXIT_S = 60.0


def _socket_of(response: httpx.Response) -> socket.socket | None:
    """The socket under a streamed response, when there is a real one."""
    network_stream = response.extensions.get("network_stream")
    if network_stream is None:
        return None
    sock = network_stream.get_extra_info("socket")
    return sock if isinstance(sock, socket.socket) else None


class DeadlineWatchdog:
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
        deadline: Deadline,
        boundary: ErrorBoundary,
        watchdog: DeadlineWatchdog,
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
