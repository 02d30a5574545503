"""The worker reads a context window its offerings lack from the client's model detail cache (warmed by
discovery, 24 h, a miss not cached), against the simulator over HTTP."""

from __future__ import annotations

import httpx
import redis

from provider.fleet.capacity import CapacityGate
from provider.fleet.health import HealthTracker
from provider.fleet.offerings import Offering
from provider.settings import InstanceSettings, Settings
from provider.vllm.client import VllmClient
from simulator.testing import SimulatorServer
from tests.conftest import STATE_DB
from tests.tasks.conftest import CHAT_MODEL


def test_a_window_the_offerings_lack_comes_from_the_cached_model_detail(
    simulator: SimulatorServer, redis_url: str
) -> None:
    from tasks.worker import ServedInstance

    simulator.reset()
    listings: list[str] = []
    http = httpx.Client(event_hooks={"request": [lambda request: listings.append(request.url.path)]})
    settings = Settings()
    instance = InstanceSettings(name="sim", base_url=simulator.url)
    state = redis.Redis.from_url(f"{redis_url}/{STATE_DB}")
    with VllmClient(instance, http=http) as client:
        served = ServedInstance(
            settings=instance,
            client=client,
            queue="llm.fleet.offering.sim.test.inference",
            health=HealthTracker.from_settings(state, settings),
            gate=CapacityGate.from_settings(client.metrics, settings),
            offerings=[Offering(instance_id="sim", model=CHAT_MODEL, context_window=None)],
        )
        (listed,) = [model for model in client.list_models() if model.id == CHAT_MODEL]  # discovery's warm-up
        assert listed.context_window is not None
        assert served.context_window(CHAT_MODEL) == listed.context_window
        assert listings.count("/v1/models") == 1  # answered from the cache
        assert served.context_window("not-served") is None  # a miss: asked, not cached, no error
        assert served.context_window("not-served") is None
        assert listings.count("/v1/models") == 3
    http.close()
    state.close()
