"""An instance's HTTP connections, split into several httpx pools when there are many.

httpcore's connection pool walks every connection and every queued request under one lock on each request and
each response close, so its cost per request grows with its size. At a few hundred connections to one vLLM
server that walk, not the network, became a worker's largest cost (measured with py-spy at 256 requests in
flight: about 28% of the worker's samples waiting on the pool's lock). The instance's connections are therefore
split into pools of at most ``SHARD_CONNECTIONS``; each request goes to the pool with the fewest requests in
flight, and the pools' limits add up to the instance's, so the instance never sees more connections than before.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterator
from typing import Any

import httpx

__all__ = ["SHARD_CONNECTIONS", "ConnectionPools"]

SHARD_CONNECTIONS = 32


class _Counted(httpx.SyncByteStream):
    """A response body that gives its request's place back when it is closed (once)."""

    def __init__(self, inner: Any, release: Callable[[], None]) -> None:
        self._inner = inner
        self._release: Callable[[], None] | None = release

    def __iter__(self) -> Iterator[bytes]:
        yield from self._inner

    def close(self) -> None:
        try:
            self._inner.close()
        finally:
            release, self._release = self._release, None
            if release is not None:
                release()


class _CountingTransport(httpx.BaseTransport):
    """An httpx transport that counts the requests in flight on it, from send to the body's close."""

    def __init__(self, inner: httpx.BaseTransport) -> None:
        self._inner = inner
        self._lock = threading.Lock()
        self.in_flight = 0

    def _release(self) -> None:
        with self._lock:
            self.in_flight -= 1

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        with self._lock:
            self.in_flight += 1
        try:
            response = self._inner.handle_request(request)
        except BaseException:
            self._release()
            raise
        response.stream = _Counted(response.stream, self._release)
        return response

    def close(self) -> None:
        self._inner.close()


class ConnectionPools:
    """An instance's httpx clients: one plain pool, or several counted ones when there are many connections."""

    def __init__(
        self,
        clients: list[httpx.Client],
        counters: list[_CountingTransport] | None = None,
        *,
        connection_limits: list[int] | None = None,
        owned: bool = True,
    ) -> None:
        self.clients = clients
        self._counters = counters or []
        self.connection_limits = connection_limits or []
        self._owned = owned

    @classmethod
    def sized(cls, connections: int, keepalive_expiry_s: float, timeout: httpx.Timeout) -> ConnectionPools:
        """``connections`` connections: one pool, or pools of at most ``SHARD_CONNECTIONS`` adding up to them."""
        count = max(1, math.ceil(connections / SHARD_CONNECTIONS))
        per_pool = math.ceil(connections / count)
        limits = httpx.Limits(
            max_connections=per_pool, max_keepalive_connections=per_pool, keepalive_expiry=keepalive_expiry_s
        )
        if count == 1:
            return cls([httpx.Client(limits=limits, timeout=timeout)], connection_limits=[per_pool])
        counters = [_CountingTransport(httpx.HTTPTransport(limits=limits)) for _ in range(count)]
        clients = [httpx.Client(transport=counter, timeout=timeout) for counter in counters]
        return cls(clients, counters, connection_limits=[per_pool] * count)

    @classmethod
    def wrapping(cls, client: httpx.Client) -> ConnectionPools:
        """One client the caller made (and closes): used as it is."""
        return cls([client], owned=False)

    def pick(self) -> httpx.Client:
        """The client whose pool has the fewest requests in flight."""
        if not self._counters:
            return self.clients[0]
        counters = self._counters
        best = min(range(len(counters)), key=lambda index: counters[index].in_flight)
        return self.clients[best]

    def close(self) -> None:
        """Close every pool this object made."""
        if not self._owned:
            return
        for client in self.clients:
            client.close()
