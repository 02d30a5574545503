"""Connection pools split by size: each request to the least busy pool, counted until its body is closed."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from provider.vllm.pools import SHARD_CONNECTIONS, ConnectionPools


@pytest.fixture
def pools() -> Iterator[ConnectionPools]:
    split = ConnectionPools.sized(3 * SHARD_CONNECTIONS, keepalive_expiry_s=4.0, timeout=httpx.Timeout(5.0))
    yield split
    split.close()


def in_flight(pools: ConnectionPools) -> list[int]:
    return [counter.in_flight for counter in pools._counters]


def test_a_small_instance_keeps_one_plain_pool() -> None:
    single = ConnectionPools.sized(SHARD_CONNECTIONS, keepalive_expiry_s=4.0, timeout=httpx.Timeout(5.0))
    try:
        assert len(single.clients) == 1
        assert single.connection_limits == [SHARD_CONNECTIONS]
        assert isinstance(single.clients[0]._transport, httpx.HTTPTransport)
        assert single.pick() is single.clients[0]
    finally:
        single.close()


def test_requests_spread_over_the_least_busy_pools_and_are_released_on_close(
    pools: ConnectionPools, simulator: Any
) -> None:
    assert pools.connection_limits == [SHARD_CONNECTIONS] * 3
    held = []
    for _ in range(3):
        http = pools.pick()
        held.append(http.send(http.build_request("GET", simulator.url + "/v1/models"), stream=True))
    assert in_flight(pools) == [1, 1, 1]  # each went to an idle pool
    for response in held:
        response.read()
        response.close()
    assert in_flight(pools) == [0, 0, 0]


def test_a_failed_request_gives_its_place_back(pools: ConnectionPools) -> None:
    http = pools.pick()
    with pytest.raises(httpx.ConnectError):
        http.get("http://127.0.0.1:9/nothing-listens-here")
    assert in_flight(pools) == [0, 0, 0]


def test_concurrent_requests_end_with_nothing_counted(pools: ConnectionPools, simulator: Any) -> None:
    errors: list[BaseException] = []

    def fetch() -> None:
        try:
            for _ in range(5):
                assert pools.pick().get(simulator.url + "/health").status_code == 200
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=fetch) for _ in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert in_flight(pools) == [0, 0, 0]
