"""A discovery refresh follows what an instance serves: new lanes gain a consumer, gone ones lose it."""

from __future__ import annotations

import pytest

from provider.protocol import FleetError
from tests.tasks.conftest import CHAT_MODEL, EMBED_MODEL, SMALL_MODEL, Fleet, wait_for

FRESH_MODEL = "fresh-model"
HELLO = [{"role": "user", "content": "new lane"}]
BASE_MODELS = [
    {"name": CHAT_MODEL, "max_model_len": 32768},
    {"name": SMALL_MODEL, "max_model_len": 4096},
    {"name": EMBED_MODEL, "max_model_len": 256, "kind": "embed"},
]


def _consumed_queues(fleet: Fleet) -> set[str]:
    from tasks import app

    replies = app.control.inspect(destination=[fleet.worker.hostname], timeout=2.0).active_queues() or {}
    return {q["name"] for queues in replies.values() for q in queues}


def test_refresh_adds_and_removes_lanes_and_consumers(fleet: Fleet) -> None:
    from tasks import chat, discover
    from tasks.routing import invalidate_route_cache

    lane = "llm.fleet.inference.fresh-model.ctx2048"
    fleet.simulator.configure(models=[*BASE_MODELS, {"name": FRESH_MODEL, "max_model_len": 2048}])
    try:
        discover.delay(instance="sim-a").get()
        invalidate_route_cache()
        wait_for(lambda: lane in _consumed_queues(fleet), what="a consumer on the new lane")
        assert chat.delay(model=FRESH_MODEL, messages=HELLO, max_tokens=8).get()["content"] == "new lane"
    finally:
        fleet.simulator.configure(models=BASE_MODELS)
        discover.delay(instance="sim-a").get()
        invalidate_route_cache()
    wait_for(lambda: lane not in _consumed_queues(fleet), what="the consumer of the gone lane cancelled")
    with pytest.raises(FleetError) as info:
        chat.delay(model=FRESH_MODEL, messages=HELLO)
    assert info.value.code == "no_fleet_queue"


def test_non_live_discovery_answers_from_cache_without_touching_the_network(fleet: Fleet) -> None:
    from tasks import discover

    before = fleet.simulator.stats()["requests"].get("models", 0)
    answer = discover.delay(instance="sim-a", live=False).get()
    assert "vllm:sim-a:inference:qwen3-6-27b" in answer["result"]["offerings"]
    assert fleet.simulator.stats()["requests"].get("models", 0) == before


def test_readiness_carries_the_load_signal(fleet: Fleet) -> None:
    from tasks import readiness

    answer = readiness.delay(instance="sim-a").get()["result"]
    assert answer["ready"] is True
    assert set(answer["load"]) == {"running", "waiting", "kv_cache_usage"}


def test_a_capability_no_offering_has_fails_at_submit(fleet: Fleet) -> None:
    from tasks import chat

    image = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AA"}}]}]
    with pytest.raises(FleetError) as info:
        chat.delay(model=CHAT_MODEL, messages=image)
    assert info.value.code == "no_fleet_queue"
    assert "vision" in info.value.message
