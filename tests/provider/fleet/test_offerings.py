"""Offerings: defaults, capability and alias normalization, eligibility, lanes, JSON and vLLM discovery."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import pytest
from pydantic import ValidationError

from provider.fleet.lanes import LaneError, choose_lane
from provider.fleet.offerings import (
    CAPABILITY_ALIASES,
    Offering,
    canonical_alias_for,
    default_offering_id,
    model_allowed,
    normalize_capabilities,
    normalize_capability,
    offerings_for_instance,
    tier_for_transport,
    vllm_capabilities,
)
from provider.settings import InstanceSettings


def seed_offering(**overrides: Any) -> Offering:
    """The seeds' ModelOffering example, in the seeds' own field names."""
    fields: dict[str, Any] = {
        "offering_id": "ollama:macbook_m4_max:inference:qwen3-6-27b-q4-k-m",
        "provider_family": "ollama",
        "provider_instance": "macbook_m4_max",
        "transport": "local",
        "tier": "local",
        "model": "qwen3.6:27b-q4_K_M",
        "canonical_model_alias": "qwen3.6:27b-q4_K_M",
        "model_family": "qwen",
        "usage_type": "inference",
        "capabilities": ["chat", "tools", "vision", "thinking"],
        "limits": {"context_window": 32_768, "max_output_tokens": 8_192},
        "health": {"ready": True, "latency_ms": 180},
        "policy_tags": ["internal_only", "phi_allowed"],
        "routing_metadata": {"region": "local", "accelerator": "metal"},
        "metadata": {"enabled": True, "eligibility": {"ac_power": True}},
    }
    fields.update(overrides)
    return Offering.model_validate(fields)


# --- capability names -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("function_calling", "tools"),
        ("tool_use", "tools"),
        ("tool_calls", "tools"),
        ("tool", "tools"),
        ("functions", "tools"),
        ("Function-Calling", "tools"),
        ("tool-use", "tools"),
        ("stream", "streaming"),
        ("stream_chat", "streaming"),
        ("stream-chat", "streaming"),
        ("embeddings", "embedding"),
        ("embed", "embedding"),
        ("reasoning", "thinking"),
        ("image_generation", "image"),
        ("images", "image"),
        ("JSON-Schema", "json_schema"),
        ("Vision", "vision"),
        ("  chat ", "chat"),
    ],
)
def test_normalize_capability(name: str, expected: str) -> None:
    assert normalize_capability(name) == expected


def test_every_alias_folds_to_a_canonical_name() -> None:
    canonical = set(CAPABILITY_ALIASES.values())
    assert canonical == {"tools", "streaming", "embedding", "thinking", "image"}
    assert all(normalize_capability(target) == target for target in canonical)


def test_normalize_capabilities_dedupes_and_sorts() -> None:
    assert normalize_capabilities(["Tools", "function_calling", "chat", "", "stream"]) == (
        "chat",
        "streaming",
        "tools",
    )
    assert normalize_capabilities(None) == ()
    assert normalize_capabilities("embed") == ("embedding",)


# --- defaults ---------------------------------------------------------------------------------------------


def test_default_offering_id_is_slugged_parts() -> None:
    offering = Offering(provider_family="ollama", instance_id="macbook_m4_max", model="qwen3.6:27b-q4_K_M")
    assert offering.offering_id == "ollama:macbook-m4-max:inference:qwen3-6-27b-q4-k-m"
    assert default_offering_id("ollama", "macbook_m4_max", "chat", "qwen3.6:27b-q4_K_M") == offering.offering_id


def test_default_offering_id_uses_the_alias() -> None:
    offering = Offering(instance_id="gpu1", model="Qwen/Qwen3-8B-AWQ", canonical_alias="qwen3:8b")
    assert offering.offering_id == "vllm:gpu1:inference:qwen3-8b"


def test_default_offering_id_refuses_empty_parts() -> None:
    with pytest.raises(ValueError, match="offering id"):
        default_offering_id("vllm", "///", "inference", "m")


def test_explicit_offering_id_is_kept() -> None:
    assert seed_offering().offering_id == "ollama:macbook_m4_max:inference:qwen3-6-27b-q4-k-m"


def test_defaults() -> None:
    offering = Offering(model=" m ")
    assert offering.provider_family == "vllm"
    assert offering.instance_id == "vllm"  # the instance defaults to the family
    assert offering.transport == "http"
    assert offering.tier == "private"
    assert offering.usage_type == "inference"
    assert offering.canonical_alias == "m"  # the model name, trimmed
    assert offering.model == " m "
    assert offering.enabled is True
    assert offering.status == "available"
    assert offering.offering_id == "vllm:vllm:inference:m"


@pytest.mark.parametrize(
    ("transport", "tier"),
    [("local", "local"), ("rabbitmq", "fleet"), ("http", "private"), ("sdk", "private")],
)
def test_tier_from_transport(transport: str, tier: str) -> None:
    assert tier_for_transport(transport) == tier
    assert Offering(model="m", transport=transport).tier == tier  # type: ignore[arg-type]


def test_explicit_tier_wins() -> None:
    assert Offering(model="m", transport="http", tier="direct").tier == "direct"


@pytest.mark.parametrize(
    ("capabilities", "usage"),
    [
        (["embedding"], "embedding"),
        (["embed"], "embedding"),
        (["embeddings"], "embedding"),
        (["chat"], "inference"),
        ([], "inference"),
    ],
)
def test_usage_inferred_from_capabilities(capabilities: list[str], usage: str) -> None:
    assert Offering(model="m", capabilities=capabilities).usage_type == usage  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("given", "usage"),
    [
        ("embed", "embedding"),
        ("embeddings", "embedding"),
        ("embedding", "embedding"),
        ("chat", "inference"),
        ("completion", "inference"),
        ("text", "inference"),
        ("inference", "inference"),
    ],
)
def test_usage_names(given: str, usage: str) -> None:
    assert Offering(model="m", usage_type=given).usage_type == usage  # type: ignore[arg-type]


def test_unknown_usage_is_refused() -> None:
    with pytest.raises(ValidationError, match="unknown usage type"):
        Offering(model="m", usage_type="transcribe")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "fields",
    [
        {},
        {"model": ""},
        {"model": "m", "transport": "carrier-pigeon"},
        {"model": "m", "tier": "galactic"},
        {"model": "m", "context_window": 0},
        {"model": "m", "health": {"status": "on-fire"}},
        {"model": "m", "surprise": True},
    ],
)
def test_invalid_offerings_are_refused(fields: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        Offering.model_validate(fields)


def test_offering_is_immutable() -> None:
    offering = seed_offering()
    with pytest.raises(ValidationError):
        offering.enabled = False  # type: ignore[misc]


def test_seed_field_names_are_accepted() -> None:
    offering = seed_offering()
    assert offering.instance_id == "macbook_m4_max"
    assert offering.canonical_alias == "qwen3.6:27b-q4_K_M"
    assert offering.context_window == 32_768
    assert offering.max_output_tokens == 8_192
    assert offering.capabilities == ("chat", "thinking", "tools", "vision")
    assert offering.policy_tags == ("internal_only", "phi_allowed")
    assert offering.model_family == "qwen"


def test_metadata_enabled_false_disables_when_enabled_not_given() -> None:
    assert seed_offering(metadata={"enabled": False}).enabled is False
    assert seed_offering(metadata={"enabled": False}, enabled=True).enabled is True


def test_health_status() -> None:
    assert seed_offering().status == "available"
    assert seed_offering(health={"ready": False}).status == "unavailable"
    assert seed_offering(health={"status": "degraded", "ready": True}).status == "degraded"


# --- eligibility ------------------------------------------------------------------------------------------


def test_seed_eligibility_example() -> None:
    assert seed_offering().eligible_for(
        usage_type="inference",
        required_capabilities=["tools"],
        min_context_window=16_000,
        policy_tags=["internal_only"],
    )


@pytest.mark.parametrize(
    ("offering_overrides", "query", "expected"),
    [
        ({}, {}, True),
        ({"enabled": False}, {}, False),
        ({}, {"usage_type": "embedding"}, False),
        ({}, {"usage_type": "chat"}, True),
        ({}, {"required_capabilities": ["function_calling"]}, True),
        ({}, {"required_capabilities": ["Tool-Use", "reasoning", "vision"]}, True),
        ({}, {"required_capabilities": ["json_schema"]}, False),
        ({}, {"required_capabilities": ["tools", "embedding"]}, False),
        ({}, {"min_context_window": 32_768}, True),
        ({}, {"min_context_window": 32_769}, False),
        ({"limits": {}}, {"min_context_window": 1}, False),  # a missing window fails a minimum
        ({"limits": {}}, {}, True),
        ({}, {"policy_tags": ["internal_only", "phi_allowed"]}, True),
        ({}, {"policy_tags": ["hipaa"]}, False),
        (
            {"health": {"status": "unavailable"}},
            {},
            True,
        ),  # health is the registry's business, not eligibility
    ],
)
def test_eligible_for(offering_overrides: dict[str, Any], query: dict[str, Any], expected: bool) -> None:
    assert seed_offering(**offering_overrides).eligible_for(**query) is expected


def test_embedding_offering_eligibility() -> None:
    offering = Offering(model="nomic-embed-text", capabilities=["embeddings"])
    assert offering.eligible_for(usage_type="embed", required_capabilities=["embed"])
    assert not offering.eligible_for(usage_type="inference")


def test_eligible_for_refuses_an_unknown_usage() -> None:
    with pytest.raises(LaneError):
        seed_offering().eligible_for(usage_type="teleport")


# --- lanes ------------------------------------------------------------------------------------------------


def test_seed_lane_keys() -> None:
    assert seed_offering().shared_lane == "llm.fleet.inference.qwen3-6-27b-q4-k-m.ctx32768"
    embed = Offering(
        provider_family="ollama",
        instance_id="gpu_embed_01",
        transport="rabbitmq",
        model="nomic-embed-text",
        usage_type="embedding",
        capabilities=["embedding"],
    )
    assert embed.shared_lane == "llm.fleet.embed.nomic-embed-text"
    assert embed.tier == "fleet"
    assert embed.offering_lane == "llm.fleet.offering.gpu-embed-01.nomic-embed-text.embed"


def test_offering_lane() -> None:
    assert seed_offering().offering_lane == "llm.fleet.offering.macbook-m4-max.qwen3-6-27b-q4-k-m.inference"


def test_lanes_use_the_canonical_alias() -> None:
    offering = Offering(instance_id="gpu1", model="Qwen/Qwen3-8B-AWQ", canonical_alias="qwen3:8b", context_window=40960)
    assert offering.shared_lane == "llm.fleet.inference.qwen3-8b.ctx40960"
    assert offering.offering_lane == "llm.fleet.offering.gpu1.qwen3-8b.inference"


def test_lane_falls_back_to_max_input_tokens() -> None:
    assert Offering(model="m", max_input_tokens=4096).shared_lane == "llm.fleet.inference.m.ctx4096"


def test_lane_styles() -> None:
    offering = seed_offering()
    assert offering.lane() == offering.shared_lane
    assert offering.lane("shared") == offering.shared_lane
    assert offering.lane("offering") == offering.offering_lane
    with pytest.raises(ValueError, match="lane style"):
        offering.lane("broadcast")  # type: ignore[arg-type]


def test_offerings_feed_choose_lane() -> None:
    small = Offering(instance_id="a", model="m", context_window=8192)
    large = Offering(instance_id="b", model="m", context_window=32768)
    embed = Offering(instance_id="c", model="e", capabilities=["embedding"])
    assert choose_lane([large, small, embed], 9000) == "llm.fleet.inference.m.ctx32768"
    assert choose_lane([large, small, embed], 100) == "llm.fleet.inference.m.ctx8192"


# --- JSON -------------------------------------------------------------------------------------------------


def test_json_round_trip() -> None:
    offering = seed_offering()
    dumped = offering.model_dump(mode="json")
    assert json.loads(json.dumps(dumped)) == dumped
    assert Offering.model_validate(dumped) == offering
    assert Offering.model_validate_json(offering.model_dump_json()) == offering
    again = Offering.model_validate(dumped)
    assert again.shared_lane == offering.shared_lane


def test_json_form_is_plain() -> None:
    dumped = seed_offering().model_dump(mode="json")
    assert dumped["capabilities"] == ["chat", "thinking", "tools", "vision"]
    assert dumped["instance_id"] == "macbook_m4_max"
    assert "limits" not in dumped
    assert "shared_lane" not in dumped


def test_round_trip_of_defaulted_offering() -> None:
    offering = Offering(model="nomic-embed-text", capabilities=["embed"], policy_tags=["b", "a", "a"])
    assert offering.policy_tags == ("a", "b")
    assert Offering.model_validate(offering.model_dump(mode="json")) == offering


# --- aliases ----------------------------------------------------------------------------------------------

ALIASES = {
    "qwen3:8b": {"vllm": "Qwen/Qwen3-8B-AWQ", "ollama": "qwen3:8b-q4_K_M"},
    "qwen3-8b-any": {"vllm": "Qwen/Qwen3-8B-AWQ"},
    "llama3.1:8b": {"ollama": "llama3.1:8b", "bedrock": "meta.llama3-1-8b"},
}


@pytest.mark.parametrize(
    ("model", "provider", "expected"),
    [
        ("Qwen/Qwen3-8B-AWQ", "vllm", "qwen3:8b"),  # the first alias wins
        ("qwen3:8b-q4_K_M", "ollama", "qwen3:8b"),
        ("qwen3:8b-q4_K_M", "vllm", "qwen3:8b-q4_K_M"),  # that id is another provider's
        ("meta.llama3-1-8b", None, "llama3.1:8b"),  # any provider when none is given
        ("meta.llama3-1-8b", "bedrock", "llama3.1:8b"),
        ("unknown-model", "vllm", "unknown-model"),
        ("  spaced-model  ", "vllm", "spaced-model"),  # otherwise the name itself, trimmed
        (" Qwen/Qwen3-8B-AWQ", "vllm", "Qwen/Qwen3-8B-AWQ"),  # the match is exact
    ],
)
def test_canonical_alias(model: str, provider: str | None, expected: str) -> None:
    assert canonical_alias_for(model, ALIASES, provider) == expected


def test_canonical_alias_without_a_table() -> None:
    assert canonical_alias_for(" m ", None) == "m"
    assert canonical_alias_for("m", {}, "vllm") == "m"


# --- allow / deny and vLLM capabilities -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("allow", "deny", "expected"),
    [
        ([], [], True),
        (["Qwen/*"], [], True),
        (["meta-llama/*"], [], False),
        ([], ["*AWQ"], False),
        (["Qwen/*"], ["*AWQ"], False),  # deny wins
        (["qwen3:*"], [], True),  # the alias matches too
        ([], ["qwen3:8b"], False),
        (["qwen/*"], [], False),  # case matters: model ids are case-sensitive
    ],
)
def test_model_allowed(allow: list[str], deny: list[str], expected: bool) -> None:
    assert model_allowed("Qwen/Qwen3-8B-AWQ", allow, deny, alias="qwen3:8b") is expected


def test_vllm_capabilities() -> None:
    assert vllm_capabilities(embedding=False) == ("chat", "streaming")
    assert vllm_capabilities(embedding=False, extra=["function_calling", "vision", "reasoning"]) == (
        "chat",
        "streaming",
        "thinking",
        "tools",
        "vision",
    )
    assert vllm_capabilities(embedding=True) == ("embedding",)
    assert vllm_capabilities(embedding=True, extra=["chat", "stream", "embeddings"]) == ("embedding",)


# --- offerings from a vLLM instance -----------------------------------------------------------------------

# /v1/models answers as a real vLLM server gives them (vllm-transcripts: models.body, embed_models.body)
TINY_LLAMA = {
    "id": "tiny-llama",
    "object": "model",
    "created": 1795304493,
    "owned_by": "vllm",
    "root": "/models/tiny-llama",
    "parent": None,
    "max_model_len": 2048,
    "permission": [{"id": "modelperm-bef3b8d4ac8a6757", "object": "model_permission"}],
}
MINILM = {
    "id": "minilm",
    "object": "model",
    "created": 1795304494,
    "owned_by": "vllm",
    "root": "/models/all-MiniLM-L6-v2",
    "parent": None,
    "max_model_len": 256,
}


def instance(**fields: Any) -> InstanceSettings:
    """An instance as the settings build it."""
    return InstanceSettings.model_validate({"name": "gpu1", "base_url": "http://10.0.0.5:8000/v1", **fields})


def test_offering_from_a_real_models_answer() -> None:
    [offering] = offerings_for_instance(instance(), [TINY_LLAMA])
    assert offering.offering_id == "vllm:gpu1:inference:tiny-llama"
    assert offering.provider_family == "vllm"
    assert offering.instance_id == "gpu1"
    assert offering.transport == "http"
    assert offering.tier == "direct"
    assert offering.usage_type == "inference"
    assert offering.capabilities == ("chat", "streaming")
    assert offering.context_window == 2048
    assert offering.shared_lane == "llm.fleet.inference.tiny-llama.ctx2048"
    assert offering.offering_lane == "llm.fleet.offering.gpu1.tiny-llama.inference"
    assert offering.metadata == {}  # the root (a path on the server) never enters an offering
    assert "/models" not in offering.model_dump_json()


def test_local_instance_tier_and_explicit_tier() -> None:
    local = InstanceSettings(name="laptop", base_url="http://localhost:8000")
    assert offerings_for_instance(local, [TINY_LLAMA])[0].tier == "local"
    pinned = instance(tier="private")
    assert offerings_for_instance(pinned, [TINY_LLAMA])[0].tier == "private"


def test_unnamed_instance_takes_the_family() -> None:
    unnamed = InstanceSettings(base_url="http://localhost:8000")
    [offering] = offerings_for_instance(unnamed, [TINY_LLAMA])
    assert offering.instance_id == "vllm"
    assert offering.offering_lane == "llm.fleet.offering.vllm.tiny-llama.inference"


@pytest.mark.parametrize(
    ("entry", "settings"),
    [
        ({**MINILM, "is_embedding": True}, {}),
        ({**MINILM, "kind": "embedding"}, {}),
        ({**MINILM, "kind": "pooling"}, {}),
        (MINILM, {"model_capabilities": {"minilm": ["embeddings"]}}),
        (MINILM, {"model_capabilities": {"minilm": ["embed", "chat", "stream"]}}),
    ],
)
def test_embedding_models(entry: dict[str, Any], settings: dict[str, Any]) -> None:
    [offering] = offerings_for_instance(instance(**settings), [entry])
    assert offering.usage_type == "embedding"
    assert offering.capabilities == ("embedding",)  # an embedding model neither chats nor streams
    assert offering.context_window == 256
    assert offering.shared_lane == "llm.fleet.embed.minilm"
    assert offering.offering_lane == "llm.fleet.offering.gpu1.minilm.embed"
    assert offering.offering_id == "vllm:gpu1:embedding:minilm"


def test_without_a_hint_a_model_is_inference() -> None:
    [offering] = offerings_for_instance(instance(), [MINILM])
    assert offering.usage_type == "inference"


def test_capabilities_from_settings() -> None:
    settings = {"model_capabilities": {"tiny-llama": ["function_calling", "vision", "reasoning"]}}
    [offering] = offerings_for_instance(instance(**settings), [TINY_LLAMA])
    assert offering.capabilities == ("chat", "streaming", "thinking", "tools", "vision")
    assert offering.eligible_for(usage_type="chat", required_capabilities=["tools", "thinking"])


def test_capabilities_by_alias_in_settings() -> None:
    aliases = {"llama-tiny": {"vllm": "tiny-llama"}}
    settings = {"model_capabilities": {"llama-tiny": ["tools"]}}
    [offering] = offerings_for_instance(instance(**settings), [TINY_LLAMA], aliases)
    assert "tools" in offering.capabilities


def test_lora_adapter_inherits_the_parent_window() -> None:
    lora = {
        "id": "sql-lora",
        "object": "model",
        "root": "/loras/sql",
        "parent": "tiny-llama",
        "max_model_len": None,
    }
    offerings = offerings_for_instance(instance(), [lora, TINY_LLAMA])
    by_model = {o.model: o for o in offerings}
    assert by_model["sql-lora"].context_window == 2048
    assert by_model["sql-lora"].shared_lane == "llm.fleet.inference.sql-lora.ctx2048"
    assert by_model["sql-lora"].metadata == {"parent": "tiny-llama"}
    assert by_model["tiny-llama"].metadata == {}


def test_lora_chain_and_missing_parent() -> None:
    first = {"id": "lora-a", "parent": "tiny-llama", "max_model_len": None}
    second = {"id": "lora-b", "parent": "lora-a", "max_model_len": None}
    orphan = {"id": "lora-c", "parent": "not-served", "max_model_len": None}
    loop = {"id": "lora-d", "parent": "lora-d", "max_model_len": None}
    offerings = {o.model: o for o in offerings_for_instance(instance(), [TINY_LLAMA, first, second, orphan, loop])}
    assert offerings["lora-b"].context_window == 2048
    assert offerings["lora-c"].context_window is None
    assert offerings["lora-c"].shared_lane == "llm.fleet.inference.lora-c"
    assert offerings["lora-d"].context_window is None


def test_lora_takes_the_parent_capabilities_when_it_has_none() -> None:
    lora = {"id": "sql-lora", "parent": "tiny-llama", "max_model_len": None}
    settings = {"model_capabilities": {"tiny-llama": ["tools"]}}
    offerings = {o.model: o for o in offerings_for_instance(instance(**settings), [TINY_LLAMA, lora])}
    assert "tools" in offerings["sql-lora"].capabilities


def test_aliases_name_offerings_and_lanes() -> None:
    entry = {"id": "Qwen/Qwen3-8B-AWQ", "max_model_len": 40960}
    [offering] = offerings_for_instance(instance(), [entry], ALIASES)
    assert offering.model == "Qwen/Qwen3-8B-AWQ"
    assert offering.canonical_alias == "qwen3:8b"
    assert offering.offering_id == "vllm:gpu1:inference:qwen3-8b"
    assert offering.shared_lane == "llm.fleet.inference.qwen3-8b.ctx40960"


def test_allow_and_deny_global_and_per_instance() -> None:
    models = [{"id": name, "max_model_len": 4096} for name in ("Qwen/Qwen3-8B", "Qwen/Qwen3-8B-AWQ", "llama-3-8b")]

    def served(settings: dict[str, Any] | None = None, **filters: Any) -> list[str]:
        return [o.model for o in offerings_for_instance(instance(**(settings or {})), models, ALIASES, **filters)]

    assert served() == ["Qwen/Qwen3-8B", "Qwen/Qwen3-8B-AWQ", "llama-3-8b"]
    assert served(allow=["Qwen/*"]) == ["Qwen/Qwen3-8B", "Qwen/Qwen3-8B-AWQ"]
    assert served(deny=["*AWQ"]) == ["Qwen/Qwen3-8B", "llama-3-8b"]
    assert served(deny=["qwen3:8b"]) == ["Qwen/Qwen3-8B", "llama-3-8b"]  # denied by its alias
    assert served({"allow_models": ["llama*"]}) == ["llama-3-8b"]
    assert served({"deny_models": ["llama*"]}, allow=["*"]) == ["Qwen/Qwen3-8B", "Qwen/Qwen3-8B-AWQ"]
    # both layers must pass: the instance narrows the global allow list
    assert served({"allow_models": ["*AWQ"]}, allow=["Qwen/*"]) == ["Qwen/Qwen3-8B-AWQ"]
    assert served({"allow_models": ["llama*"]}, allow=["Qwen/*"]) == []


def test_unusable_instances_offer_nothing() -> None:
    assert offerings_for_instance(instance(enabled=False), [TINY_LLAMA]) == []
    assert offerings_for_instance(InstanceSettings(name="x"), [TINY_LLAMA]) == []


def test_policy_tags_and_health_from_the_caller() -> None:
    settings = {"policy_tags": ["phi_allowed", "internal_only"]}
    health = {"status": "degraded", "latency_ms": 900}
    [offering] = offerings_for_instance(instance(**settings), [TINY_LLAMA], health=health)
    assert offering.policy_tags == ("internal_only", "phi_allowed")
    assert offering.health == health
    assert offering.status == "degraded"
    assert offering.eligible_for(policy_tags=["phi_allowed"])


def test_model_entries_as_objects() -> None:
    @dataclass
    class ModelInfo:
        id: str
        max_model_len: int | None = None
        parent: str | None = None
        kind: str | None = None

    entries = [
        ModelInfo("base", 8192),
        ModelInfo("adapter", None, "base"),
        ModelInfo("e5", 512, kind="embedding"),
    ]
    offerings = {o.model: o for o in offerings_for_instance(instance(), entries)}
    assert offerings["adapter"].context_window == 8192
    assert offerings["e5"].usage_type == "embedding"
    assert offerings["base"].shared_lane == "llm.fleet.inference.base.ctx8192"


def test_context_window_alternatives_and_bad_entries() -> None:
    entries: list[dict[str, Any]] = [
        {"id": "a", "context_window": 1024},
        {"id": "a", "max_model_len": 999},  # a duplicate id: the first wins
        {"object": "model"},  # no id
        {"id": "   "},
        {"id": "b", "max_model_len": "large"},
    ]
    offerings = offerings_for_instance(instance(), entries)
    assert [(o.model, o.context_window) for o in offerings] == [("a", 1024), ("b", None)]


def test_offerings_round_trip_as_json() -> None:
    lora = {"id": "sql-lora", "parent": "tiny-llama", "max_model_len": None}
    for offering in offerings_for_instance(instance(), [TINY_LLAMA, lora, {**MINILM, "is_embedding": True}]):
        assert Offering.model_validate(offering.model_dump(mode="json")) == offering


def test_an_offering_with_tools_also_serves_its_capability_lanes() -> None:
    """Tools (and vision) qualify lanes: an offering lists one lane per non-empty set of them; others none."""
    from provider.fleet.offerings import Offering

    both = Offering(model="m", instance_id="a", capabilities=["chat", "tools", "vision"], context_window=4096)
    assert both.capability_lanes() == [
        "llm.fleet.inference.m.ctx4096.cap.tools",
        "llm.fleet.inference.m.ctx4096.cap.vision",
        "llm.fleet.inference.m.ctx4096.cap.tools-vision",
    ]
    plain = Offering(model="m", instance_id="b", capabilities=["chat"], context_window=4096)
    assert plain.capability_lanes() == []
    with pytest.raises(ValueError, match="lacks tools"):
        plain.lane("shared", capabilities=["tools"])
