"""Real worker processes: lanes a worker does not serve never reach it (redelivery is in test_replay.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from provider.settings import InstanceSettings, Settings
from simulator.config import ServedModel, SimulatorConfig
from simulator.testing import SimulatorServer
from tests.tasks.conftest import Fleet, WorkerProcess, wait_for

OTHER_MODEL = "other-chat"
HELLO = [{"role": "user", "content": "hello other lane"}]


@pytest.fixture(scope="module")
def other_simulator() -> Iterator[SimulatorServer]:
    """A second vLLM (simulated) serving a model the in-process worker does not."""
    config = SimulatorConfig(models=[ServedModel(name=OTHER_MODEL, max_model_len=8192)], max_running=16)
    with SimulatorServer(config) as server:
        yield server


def other_settings(fleet: Fleet, sim: SimulatorServer) -> Settings:
    """The fleet's settings with only the second instance: what its worker process is given."""
    return fleet.settings.model_copy(
        update={"instances": {"sim-b": InstanceSettings(name="sim-b", base_url=sim.url, concurrency=4)}}
    )


def _registered(fleet: Fleet, model: str) -> bool:
    from tasks.routing import invalidate_route_cache
    from tasks.runtime import runtime

    invalidate_route_cache()
    return any(o.model == model for o in runtime().registry.all())


def test_work_reaches_only_the_worker_serving_its_lane(fleet: Fleet, other_simulator: SimulatorServer) -> None:
    from tasks import chat

    other_simulator.reset()
    worker = WorkerProcess(other_settings(fleet, other_simulator), "sim-b")
    try:
        wait_for(lambda: _registered(fleet, OTHER_MODEL), what="the second worker's offerings")
        before = fleet.simulator.stats()["requests"]
        reply = chat.delay(model=OTHER_MODEL, messages=HELLO, max_tokens=16).get()
        assert reply["metadata"]["instance"] == "sim-b"
        assert reply["content"] == "hello other lane"
        assert fleet.simulator.stats()["requests"] == before
        assert other_simulator.stats()["requests"]["chat"] == 1
    finally:
        worker.stop()
