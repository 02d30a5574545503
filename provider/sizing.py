"""How big a worker is, in one place: its processes, each process's share of an instance's slots, its threads and
its Redis connection pool. The CLI (``vllm-fleet worker``), the worker's Celery config, the runtime, the benchmark
and ``scripts/fleet.py`` all size workers from here, so their numbers cannot disagree.

Pure arithmetic on the instances' ``concurrency`` (their slots) and the cores; no settings object, no I/O beyond
reading this process's CPU affinity and cgroup quota.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Final

__all__ = [
    "CGROUP_CPU_MAX",
    "MANAGEMENT_THREADS",
    "MIN_REDIS_POOL",
    "SLOTS_PER_PROCESS",
    "available_cores",
    "cgroup_cpu_limit",
    "default_process_count",
    "process_share",
    "process_shares",
    "redis_pool_size",
    "worker_threads",
]

# Requests in flight one process keeps up with before its one core runs out (measured on 2 cores, TTFT 100 ms,
# 16 tokens: one process relays about 90 chats/s at 0.8 core, which is about 36 requests of 0.4 s in flight).
SLOTS_PER_PROCESS: Final = 32
# Threads beyond the instances' slots: management calls (health, sleep, ...) run beside a full load.
MANAGEMENT_THREADS: Final = 2
# redis-py's default pool; a worker's pool grows past it with its threads (each may hold a connection at once:
# the default of 100 raised ``MaxConnectionsError`` under a worker with ``-c 256``).
MIN_REDIS_POOL: Final = 100
_REDIS_POOL_SPARE: Final = 32
CGROUP_CPU_MAX: Final = Path("/sys/fs/cgroup/cpu.max")


def worker_threads(concurrencies: Sequence[int]) -> int:
    """Threads of one worker process serving instances with these slots: one per slot, plus management's."""
    return sum(concurrencies) + MANAGEMENT_THREADS


def redis_pool_size(concurrencies: Sequence[int]) -> int:
    """Redis connections one worker process may hold at once (two per slot, and some spare)."""
    return max(MIN_REDIS_POOL, 2 * sum(concurrencies) + _REDIS_POOL_SPARE)


def default_process_count(concurrencies: Sequence[int], cores: int | None = None) -> int:
    """Worker processes for instances allowing ``concurrencies`` requests at once: one per ``SLOTS_PER_PROCESS``
    requests in flight, at most one per core, and no more than the smallest instance has slots to share."""
    if not concurrencies:
        return 1
    cores = available_cores() if cores is None else cores
    return max(1, min(cores, sum(concurrencies) // SLOTS_PER_PROCESS, min(concurrencies)))


def process_share(concurrency: int, processes: int, index: int) -> int:
    """Process ``index`` (1..``processes``)'s share of an instance's ``concurrency`` slots: 1/K each, the first
    ``concurrency % K`` processes one more, so the shares add up to the instance's (and never below one)."""
    if not 1 <= index <= processes:
        raise ValueError(f"process index {index} is outside 1..{processes}")
    return max(1, concurrency // processes + (1 if index <= concurrency % processes else 0))


def process_shares(concurrency: int, processes: int) -> list[int]:
    """Every process's share of ``concurrency`` slots, process 1 first."""
    return [process_share(concurrency, processes, index) for index in range(1, processes + 1)]


def cgroup_cpu_limit(cpu_max: Path = CGROUP_CPU_MAX) -> int | None:
    """Whole cores a cgroup v2 CPU quota allows (``docker run --cpus``, Kubernetes limits), rounded up; None
    without a quota."""
    try:
        quota, period = cpu_max.read_text().split()[:2]
        if quota == "max":
            return None
        return max(1, math.ceil(int(quota) / int(period)))
    except (OSError, ValueError):
        return None


def available_cores() -> int:
    """The cores this process may use: its CPU affinity (where the OS tells it, else every core), capped by a
    container's CPU quota."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        cores = os.cpu_count() or 1
    limit = cgroup_cpu_limit()
    return max(1, min(cores, limit) if limit else cores)
