"""Worker sizing has one home (``provider.sizing``): the process count, each process's share of an instance's
slots, the threads and the Redis pool. The CLI, the Celery config, the runtime, ``Settings`` and the benchmark
read it, so their numbers agree."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from provider.settings import InstanceSettings, Settings
from provider.sizing import (
    MANAGEMENT_THREADS,
    MIN_REDIS_POOL,
    SLOTS_PER_PROCESS,
    available_cores,
    cgroup_cpu_limit,
    default_process_count,
    process_share,
    process_shares,
    redis_pool_size,
    worker_threads,
)


@pytest.mark.parametrize(("concurrency", "processes"), [(4, 2), (5, 3), (256, 2), (7, 7), (63, 2)])
def test_the_process_shares_add_up_to_the_instance_limit(concurrency: int, processes: int) -> None:
    shares = process_shares(concurrency, processes)
    assert sum(shares) == concurrency
    assert max(shares) - min(shares) <= 1
    assert shares == sorted(shares, reverse=True)  # the first processes take the remainder


def test_settings_take_their_process_share_from_the_same_formula() -> None:
    instances = {"a": InstanceSettings(name="a", base_url="http://gpu.test:8000", concurrency=5)}
    taken = [
        Settings(instances=instances, worker_processes=3, worker_process_index=index).instances["a"].concurrency
        for index in (1, 2, 3)
    ]
    assert taken == process_shares(5, 3) == [2, 2, 1]


def test_a_share_never_drops_below_one_slot_and_the_index_is_checked() -> None:
    assert process_share(2, 4, 4) == 1
    with pytest.raises(ValueError, match="outside"):
        process_share(8, 2, 3)


@pytest.mark.parametrize(
    ("concurrencies", "cores", "processes"),
    [
        ([8], 2, 1),  # a few slots: one process keeps up
        ([64], 2, 2),  # two processes' worth of slots
        ([256], 2, 2),  # never more than one per core
        ([256], 8, 8),
        ([200, 56], 16, 8),  # the slots of every instance count
        ([300, 3], 16, 3),  # each process needs a slot of every instance to share
        ([], 4, 1),  # nothing configured yet
        ([1000], 1, 1),
    ],
)
def test_the_default_process_count_follows_the_slots_and_the_cores(
    concurrencies: list[int], cores: int, processes: int
) -> None:
    assert SLOTS_PER_PROCESS == 32
    assert default_process_count(concurrencies, cores) == processes


def test_threads_and_redis_pool_grow_with_the_slots() -> None:
    assert worker_threads([16, 8]) == 24 + MANAGEMENT_THREADS
    assert redis_pool_size([8]) == MIN_REDIS_POOL  # small workers keep redis-py's default
    assert redis_pool_size([256]) == 2 * 256 + 32  # -c 256 needs more than 100 (MaxConnectionsError before)


def test_the_celery_config_and_the_runtime_use_the_formulas() -> None:
    from celeryconfig import build_config
    from tasks.runtime import FleetRuntime

    instances = {
        "a": InstanceSettings(name="a", base_url="http://a.test:8000", concurrency=100),
        "b": InstanceSettings(name="b", base_url="http://b.test:8000", concurrency=28),
    }
    settings = Settings(instances=instances, redis_url="redis://127.0.0.1:6379/0")
    config = build_config(settings)
    assert config["worker_concurrency"] == worker_threads([100, 28])
    assert config["redis_max_connections"] == redis_pool_size([100, 28])
    client = FleetRuntime(settings).redis
    assert client.connection_pool.max_connections == redis_pool_size([100, 28])
    client.close()


@pytest.mark.parametrize(
    ("cpu_max", "cores"),
    [("150000 100000\n", 2), ("100000 100000\n", 1), ("50000 100000\n", 1), ("max 100000\n", None)],
)
def test_a_container_cpu_quota_caps_the_cores(tmp_path: Path, cpu_max: str, cores: int | None) -> None:
    path = tmp_path / "cpu.max"
    path.write_text(cpu_max)
    assert cgroup_cpu_limit(path) == cores
    assert cgroup_cpu_limit(tmp_path / "missing") is None
    assert 1 <= available_cores() <= (os.cpu_count() or 1)
