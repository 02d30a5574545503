"""Discovery on the simulator: one embedding probe per model; a transient probe failure reclassifies nothing."""

from __future__ import annotations

import pytest

from provider.client import VllmClient
from provider.discovery import discover_offerings
from provider.errors import ProviderError
from provider.settings import InstanceSettings, Settings
from simulator.config import ServedModel, SimulatorConfig
from simulator.testing import SimulatorServer


def test_embedding_probe_is_remembered_and_a_transient_failure_raises() -> None:
    config = SimulatorConfig(
        models=[
            ServedModel(name="chatty", max_model_len=2048),
            ServedModel(name="vec", max_model_len=256, kind="embed"),
        ]
    )
    with SimulatorServer(config) as sim:
        instance = InstanceSettings(name="probe-sim", base_url=sim.url)
        settings = Settings(probe_localhost=False)
        with VllmClient(instance) as client:
            first = {o.model: o.usage_type for o in discover_offerings(client, instance, settings)}
            assert first == {"chatty": "inference", "vec": "embedding"}
            probes = sim.stats()["requests"].get("embeddings", 0)
            assert {o.model: o.usage_type for o in discover_offerings(client, instance, settings)} == first
            assert sim.stats()["requests"].get("embeddings", 0) == probes, "known models are not probed again"

            sim.configure(
                models=[*config.model_dump()["models"], {"name": "newvec", "max_model_len": 256, "kind": "embed"}],
                failures=[{"route": "embeddings", "mode": "status", "status": 503, "count": 1}],
            )
            with pytest.raises(ProviderError):
                discover_offerings(client, instance, settings)
            again = {o.model: o.usage_type for o in discover_offerings(client, instance, settings)}
            assert again["newvec"] == "embedding"
