"""Discovery on the simulator: one embedding probe per model; a transient probe failure reclassifies nothing."""

from __future__ import annotations

import pytest

from provider.settings import InstanceSettings, Settings
from provider.vllm.client import VllmClient
from provider.vllm.discovery import discover_offerings
from provider.vllm.errors import ProviderError
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


@pytest.mark.parametrize("tool_parser", [True, False], ids=["with-parser", "without-parser"])
def test_a_claimed_tools_capability_is_checked_once_against_the_server(tool_parser: bool) -> None:
    """Settings that say a model serves tools are checked with one tools request: a server without a tool-call
    parser refuses it, and its offering goes without ``tools`` (so no tool request is routed to it)."""
    config = SimulatorConfig(models=[ServedModel(name="chatty", max_model_len=2048)], tool_parser=tool_parser)
    with SimulatorServer(config) as sim:
        instance = InstanceSettings(
            name=f"tools-{tool_parser}", base_url=sim.url, model_capabilities={"chatty": ["tools"]}
        )
        settings = Settings(probe_localhost=False)
        with VllmClient(instance) as client:
            offerings = discover_offerings(client, instance, settings)
            assert ("tools" in offerings[0].capabilities) is tool_parser
            assert sim.stats()["requests"]["chat"] == 1
            assert discover_offerings(client, instance, settings) == offerings
            assert sim.stats()["requests"]["chat"] == 1, "the answer is remembered"
