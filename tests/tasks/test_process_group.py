"""``vllm-fleet worker --processes K``: K real worker processes that share one instance's slots, as one unit."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from provider.settings import InstanceSettings, Settings
from provider.sizing import SLOTS_PER_PROCESS, default_process_count
from simulator.config import ServedModel, SimulatorConfig
from simulator.testing import SimulatorServer
from tasks.cli import worker_group_argv
from tasks.process_group import child_node_name
from tests.tasks.conftest import Fleet, wait_for

GROUP_MODEL = "group-chat"
INSTANCE = "sim-group"
SLOTS = 4


@pytest.fixture(scope="module")
def group_simulator() -> Iterator[SimulatorServer]:
    """A vLLM (simulated) that only the worker group serves."""
    config = SimulatorConfig(models=[ServedModel(name=GROUP_MODEL, max_model_len=2048)], max_running=64)
    with SimulatorServer(config) as server:
        yield server


def group_settings(fleet: Fleet, sim: SimulatorServer, concurrency: int = SLOTS) -> Settings:
    instance = InstanceSettings(name=INSTANCE, base_url=sim.url, concurrency=concurrency)
    return fleet.settings.model_copy(update={"instances": {INSTANCE: instance}})


def start_group(settings: Settings, processes: int, name: str) -> subprocess.Popen[str]:
    env = {**os.environ, **settings.to_env(), "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        worker_group_argv(name, processes), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )


def answering_nodes(prefix: str) -> set[str]:
    from tasks.app import app

    replies = app.control.ping(timeout=0.5) or []
    return {node for reply in replies for node in reply if node.startswith(prefix)}


def stop(group: subprocess.Popen[str]) -> int:
    if group.poll() is None:
        group.send_signal(signal.SIGTERM)
    try:
        return group.wait(timeout=30)
    except subprocess.TimeoutExpired:
        group.kill()
        group.wait(timeout=10)
        raise


# -- the shares, without processes ----------------------------------------------------------------------


def test_each_process_serves_metrics_on_its_own_port() -> None:
    ports = [
        Settings(metrics_port=9100, worker_processes=3, worker_process_index=index).metrics_port for index in (1, 2, 3)
    ]
    assert ports == [9100, 9101, 9102]


def test_a_process_index_beyond_the_group_is_refused() -> None:
    with pytest.raises(ValueError, match="beyond worker_processes"):
        Settings(worker_processes=2, worker_process_index=3)


def test_a_worker_without_processes_sizes_its_group_from_the_cores_and_the_slots(
    fleet: Fleet, group_simulator: SimulatorServer
) -> None:
    slots = 2 * SLOTS_PER_PROCESS
    expected = default_process_count([slots])  # this machine's cores decide too (2 here: two processes)
    settings = group_settings(fleet, group_simulator, concurrency=slots)
    env = {**os.environ, **settings.to_env(), "PYTHONUNBUFFERED": "1"}
    argv = [sys.executable, "-m", "tasks.cli", "worker", "--hostname", "auto@%h", "--loglevel", "WARNING"]
    group = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        if expected == 1:
            wait_for(lambda: answering_nodes("auto") != set(), timeout_s=60, what="the worker answering")
            assert {node.partition("@")[0] for node in answering_nodes("auto")} == {"auto"}
        else:
            names = {f"auto-{i}" for i in range(1, expected + 1)}
            seen: set[str] = set()

            def every_process_answers() -> bool:  # one ping's answer, so a slow reply later cannot drop a node
                seen.clear()
                seen.update(answering_nodes("auto-"))
                return len(seen) == expected

            wait_for(every_process_answers, timeout_s=60, what="every process answering")
            assert {node.partition("@")[0] for node in seen} == names
    finally:
        code = stop(group)
    assert code == 0


def test_child_node_names() -> None:
    assert child_node_name("chat@%h", 2) == "chat-2@%h"
    assert child_node_name(None, 1) == "worker-1@%h"
    assert child_node_name("solo", 3) == "solo-3@%h"


def test_more_processes_than_an_instance_has_slots_is_a_clear_error(
    fleet: Fleet, group_simulator: SimulatorServer
) -> None:
    group = start_group(group_settings(fleet, group_simulator, concurrency=2), 3, "too-many")
    _, err = group.communicate(timeout=60)
    assert group.returncode == 1
    assert "sim-group (2)" in err
    assert "Traceback" not in err


# -- the group, for real ----------------------------------------------------------------------------------


def test_a_group_serves_as_one_worker_within_the_instance_limit_and_stops_whole(
    fleet: Fleet, group_simulator: SimulatorServer
) -> None:
    from tasks import chat
    from tasks.routing import invalidate_route_cache

    group_simulator.reset()
    group_simulator.configure(itl_s=0.02)
    group = start_group(group_settings(fleet, group_simulator), 2, "grp")
    try:
        wait_for(lambda: len(answering_nodes("grp-")) == 2, timeout_s=60, what="both processes answering")
        invalidate_route_cache()
        replies: list[Any] = []

        def ask(index: int) -> None:
            messages = [{"role": "user", "content": f"group {index}"}]
            replies.append(chat.delay(model=GROUP_MODEL, messages=messages, max_tokens=24).get(timeout=60))

        callers = [threading.Thread(target=ask, args=(i,)) for i in range(12)]
        for caller in callers:
            caller.start()
        for caller in callers:
            caller.join()
        assert sorted(reply["content"] for reply in replies) == sorted(f"group {i}" for i in range(12))
        assert {reply["metadata"]["instance"] for reply in replies} == {INSTANCE}
        stats = group_simulator.stats()
        assert 2 <= stats["max_in_flight_seen"] <= SLOTS  # two processes at once, never over the instance's limit
    finally:
        code = stop(group)
    assert code == 0
    assert answering_nodes("grp-") == set()


def test_when_one_process_dies_the_group_stops(fleet: Fleet, group_simulator: SimulatorServer) -> None:
    import psutil

    group = start_group(group_settings(fleet, group_simulator), 2, "fragile")
    try:
        wait_for(lambda: len(answering_nodes("fragile-")) == 2, timeout_s=60, what="both processes answering")
        children = psutil.Process(group.pid).children()
        assert len(children) == 2
        children[0].kill()
        wait_for(lambda: group.poll() is not None, timeout_s=30, what="the group ending with one of its processes")
        assert group.returncode != 0
        assert not children[1].is_running() or children[1].status() == psutil.STATUS_ZOMBIE
    finally:
        if group.poll() is None:
            stop(group)
