"""``vllm-fleet worker --processes K``: K worker processes that share each instance's slots, run as one unit.

A Python process runs at most one core's worth of Python at a time (the GIL), and a worker relaying hundreds of
requests to vLLM needs more than that (measured: one process tops out at about 0.8 core, 90 chats/s here). The
group starts K ordinary worker processes: process i is told its place (``VLLM_FLEET_WORKER_PROCESS_INDEX``) and
takes its share of every instance's concurrency (``Settings._take_process_share``, by
``provider.sizing.process_share``), so the instance sees no more requests at once than configured. Each is its
own Celery node (``name-i@host``). Signals go to every process; when one process ends, the others are stopped too,
and the group exits with the first failure's status, so whatever supervises the worker (systemd, Docker,
Kubernetes) restarts it whole.

Without ``--processes`` (or ``WORKER_PROCESSES``) the worker sizes the group itself: ``default_process_count``
(``provider.sizing``, beside each process's share and thread count).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from types import FrameType

from provider.settings import InstanceSettings
from provider.vllm.errors import ProviderConfigurationError

__all__ = ["child_node_name", "run_worker_group"]

_POLL_S = 0.2
_FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT)


def child_node_name(hostname: str | None, index: int) -> str:
    """``chat@%h`` → ``chat-2@%h`` for process 2 (``worker-2@%h`` without a name)."""
    node, _, host = (hostname or "worker@%h").partition("@")
    return f"{node}-{index}@{host or '%h'}"


def _check_shares(count: int, instances: Sequence[InstanceSettings]) -> None:
    too_small = [f"{i.name} ({i.concurrency})" for i in instances if i.concurrency < count]
    if too_small:
        raise ProviderConfigurationError(
            f"--processes {count} splits each instance's concurrency between the processes, but these instances "
            f"allow fewer requests at once than that: {', '.join(too_small)}"
        )


def run_worker_group(
    count: int,
    instances: Sequence[InstanceSettings],
    *,
    hostname: str | None,
    loglevel: str,
    concurrency: int = 0,
) -> int:
    """Run ``count`` worker processes until one ends or a signal stops them; the group's exit status."""
    _check_shares(count, instances)
    children: list[subprocess.Popen[bytes]] = []
    for index in range(1, count + 1):
        argv = [sys.executable, "-m", "tasks.cli", "worker", "--processes", "1"]
        argv += ["--hostname", child_node_name(hostname, index), "--loglevel", loglevel]
        if concurrency:
            argv += ["--concurrency", str(concurrency)]
        env_index = {"VLLM_FLEET_WORKER_PROCESSES": str(count), "VLLM_FLEET_WORKER_PROCESS_INDEX": str(index)}
        children.append(subprocess.Popen(argv, env={**os.environ, **env_index}))

    def forward(signum: int, _frame: FrameType | None) -> None:
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    previous = {signum: signal.signal(signum, forward) for signum in _FORWARDED}
    try:
        while all(child.poll() is None for child in children):
            time.sleep(_POLL_S)
        forward(signal.SIGTERM, None)  # one ended: stop the rest (warm shutdown, like the first)
        codes = [child.wait() for child in children]
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return next((code for code in codes if code not in (0, -signal.SIGTERM)), 0)
