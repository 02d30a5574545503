"""Capacity-aware consumption: a worker stops taking from its lanes while its vLLM is overloaded."""

from __future__ import annotations

from provider.settings import InstanceSettings
from simulator.config import ServedModel, SimulatorConfig
from simulator.testing import SimulatorServer
from tests.tasks.conftest import Fleet, WorkerProcess, wait_for

BUSY_MODEL = "busy-model"
LANE = "llm.fleet.inference.busy-model.ctx4096"


def _consumes(worker_name: str) -> bool | None:
    from tasks import app

    replies = app.control.inspect(timeout=1.0).active_queues() or {}
    for hostname, queues in replies.items():
        if hostname.startswith(f"{worker_name}@"):
            return any(q["name"] == LANE for q in queues)
    return None


def test_worker_pauses_lanes_while_vllm_is_overloaded_and_resumes_after(fleet: Fleet) -> None:
    from tasks import chat
    from tasks.routing import invalidate_route_cache

    config = SimulatorConfig(models=[ServedModel(name=BUSY_MODEL, max_model_len=4096)], max_running=1, ttft_s=0.6)
    with SimulatorServer(config) as sim:
        settings = fleet.settings.model_copy(
            update={
                "instances": {"sim-busy": InstanceSettings(name="sim-busy", base_url=sim.url, concurrency=6)},
                "pause_when_waiting_over": 1,
                "capacity_check_interval_s": 0.1,
            }
        )
        worker = WorkerProcess(settings, "busy-worker")
        try:
            wait_for(lambda: _consumes("busy-worker") is True, what="the busy worker consuming its lane")
            invalidate_route_cache()
            hello = [{"role": "user", "content": "wait your turn"}]
            results = [chat.delay(model=BUSY_MODEL, messages=hello, max_tokens=4, timeout_s=30) for _ in range(6)]
            wait_for(lambda: _consumes("busy-worker") is False, what="the lane paused under load")
            assert all(r.get()["content"] == "wait your turn" for r in results)
            wait_for(lambda: _consumes("busy-worker") is True, what="the lane resumed after the load")
        finally:
            worker.stop()
