"""Lane keys: slugs, shared and offering keys, parsing, lane choice and token estimates."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
from hypothesis import given
from hypothesis import strategies as st

from provider.fleet.lanes import (
    LaneError,
    LaneKey,
    NoLaneError,
    choose_lane,
    lane_kind,
    normalize_usage_type,
    offering_lane_key,
    parse_lane,
    shared_lane_key,
    slug,
)
from provider.fleet.token_estimate import (
    BYTES_PER_TOKEN_ESTIMATE,
    MESSAGE_OVERHEAD_TOKENS,
    REPLY_PRIMING_TOKENS,
    estimate_tokens,
    needed_context,
)

# --- slug -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("qwen3.6:27b-q4_K_M", "qwen3-6-27b-q4-k-m"),
        ("nomic-embed-text:latest", "nomic-embed-text-latest"),
        ("---Qwen///3.5:::27B---", "qwen-3-5-27b"),
        ("---Qwen///3.6:::27B---", "qwen-3-6-27b"),
        ("qwen3.6:27b", "qwen3-6-27b"),
        ("qwen3.5:27b", "qwen3-5-27b"),
        ("qwen3.6-27b", "qwen3-6-27b"),
        ("macbook_m4_max", "macbook-m4-max"),
        ("env_bearer", "env-bearer"),
        ("meta-llama/Llama-3.1-8B-Instruct", "meta-llama-llama-3-1-8b-instruct"),
        ("  spaced  out  ", "spaced-out"),
        ("///", ""),
        ("", ""),
        ("Ünïcödé-model", "n-c-d-model"),
    ],
)
def test_slug(text: str, expected: str) -> None:
    assert slug(text) == expected


@given(st.text())
def test_slug_is_lowercase_alnum_runs_and_idempotent(text: str) -> None:
    result = slug(text)
    assert all(ch.isascii() and (ch.isdigit() or ch.islower() or ch == "-") for ch in result)
    assert "--" not in result
    assert not result.startswith("-")
    assert not result.endswith("-")
    assert slug(result) == result


# --- usage and kind ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["embed", "embeddings", "embedding", " Embedding "])
def test_embedding_usage_names(name: str) -> None:
    assert normalize_usage_type(name) == "embedding"
    assert lane_kind(name) == "embed"


@pytest.mark.parametrize("name", ["chat", "completion", "text", "inference", "generation"])
def test_inference_usage_names(name: str) -> None:
    assert normalize_usage_type(name) == "inference"
    assert lane_kind(name) == "inference"


def test_unknown_usage_is_refused() -> None:
    with pytest.raises(LaneError, match="unknown usage type"):
        normalize_usage_type("image")


# --- shared lane keys -------------------------------------------------------------------------------------


def test_shared_inference_lane_with_context() -> None:
    assert (
        shared_lane_key("qwen3.6:27b-q4_K_M", "inference", context_window=32_768)
        == "llm.fleet.inference.qwen3-6-27b-q4-k-m.ctx32768"
    )


def test_shared_lane_seed_examples() -> None:
    assert shared_lane_key("qwen3.5:27b", "chat", context_window=32_768) == "llm.fleet.inference.qwen3-5-27b.ctx32768"
    assert shared_lane_key("qwen3.6-27b", context_window=65_536) == "llm.fleet.inference.qwen3-6-27b.ctx65536"
    assert shared_lane_key("qwen3-6-27b", context_window=32_000) == "llm.fleet.inference.qwen3-6-27b.ctx32000"
    assert shared_lane_key("nomic-embed-text", "embedding") == "llm.fleet.embed.nomic-embed-text"
    assert shared_lane_key("nomic-embed-text:latest", "embed") == "llm.fleet.embed.nomic-embed-text-latest"
    assert (
        shared_lane_key("---Qwen///3.5:::27B---", "chat", context_window=32_768)
        == "llm.fleet.inference.qwen-3-5-27b.ctx32768"
    )


def test_context_window_is_exact_not_bucketed() -> None:
    assert shared_lane_key("m", context_window=12_345).endswith(".ctx12345")


def test_embedding_lane_omits_context() -> None:
    assert shared_lane_key("nomic-embed-text", "embedding", context_window=8192) == "llm.fleet.embed.nomic-embed-text"


def test_inference_lane_without_window_has_no_ctx() -> None:
    assert shared_lane_key("qwen3.6:27b") == "llm.fleet.inference.qwen3-6-27b"


def test_context_falls_back_to_max_input_tokens() -> None:
    assert shared_lane_key("m", max_input_tokens=4096) == "llm.fleet.inference.m.ctx4096"
    assert shared_lane_key("m", context_window=8192, max_input_tokens=4096) == "llm.fleet.inference.m.ctx8192"


@pytest.mark.parametrize("window", [0, -1, True, 1.5])
def test_bad_context_window_is_refused(window: object) -> None:
    with pytest.raises(LaneError, match="context window"):
        shared_lane_key("m", context_window=window)  # type: ignore[arg-type]


def test_empty_model_is_refused() -> None:
    with pytest.raises(LaneError, match="model"):
        shared_lane_key(":::")


def test_whole_key_length_is_bounded() -> None:
    with pytest.raises(LaneError, match="255"):
        shared_lane_key("m" * 300)


# --- offering lane keys -----------------------------------------------------------------------------------


def test_offering_lane_keys() -> None:
    assert offering_lane_key("gpu-01", "qwen3.6:27b", "generation") == "llm.fleet.offering.gpu-01.qwen3-6-27b.inference"
    assert offering_lane_key("macbook-m4", "qwen3.6:27b") == "llm.fleet.offering.macbook-m4.qwen3-6-27b.inference"
    assert (
        offering_lane_key("gpu-01", "nomic-embed-text:latest", "embed")
        == "llm.fleet.offering.gpu-01.nomic-embed-text-latest.embed"
    )
    assert offering_lane_key("vllm", "qwen3.6-27b", "chat") == "llm.fleet.offering.vllm.qwen3-6-27b.inference"
    assert (
        offering_lane_key("vllm-gpu-01", "qwen3.6", "inference") == "llm.fleet.offering.vllm-gpu-01.qwen3-6.inference"
    )


def test_offering_instance_label_is_slugged_not_judged() -> None:
    assert (
        offering_lane_key("env_bearer", "qwen3.6:27b", "generation")
        == "llm.fleet.offering.env-bearer.qwen3-6-27b.inference"
    )


def test_offering_instance_empty_after_slugging_is_refused() -> None:
    with pytest.raises(LaneError, match="instance"):
        offering_lane_key("///", "qwen3.6:27b")


# --- parsing ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "parts"),
    [
        (
            "llm.fleet.inference.qwen3-6-27b-q4-k-m.ctx32768",
            LaneKey(style="shared", kind="inference", model_slug="qwen3-6-27b-q4-k-m", context_window=32768),
        ),
        (
            "llm.fleet.embed.nomic-embed-text",
            LaneKey(style="shared", kind="embed", model_slug="nomic-embed-text"),
        ),
        ("llm.fleet.inference.m", LaneKey(style="shared", kind="inference", model_slug="m")),
        (
            "llm.fleet.offering.gpu-01.nomic-embed-text-latest.embed",
            LaneKey(style="offering", kind="embed", model_slug="nomic-embed-text-latest", instance_slug="gpu-01"),
        ),
        (
            "llm.fleet.offering.macbook-m4.qwen3-6-27b.inference",
            LaneKey(style="offering", kind="inference", model_slug="qwen3-6-27b", instance_slug="macbook-m4"),
        ),
        # a model slug that looks like a keyword is still the model: positions decide
        ("llm.fleet.inference.offering.ctx8", LaneKey("shared", "inference", "offering", context_window=8)),
        ("llm.fleet.inference.ctx5", LaneKey("shared", "inference", "ctx5")),
    ],
)
def test_parse_lane_round_trips(key: str, parts: LaneKey) -> None:
    parsed = parse_lane(key)
    assert parsed == parts
    assert parsed.key == key
    assert str(parsed) == key


def test_parsed_usage_type() -> None:
    assert parse_lane("llm.fleet.embed.e5").usage_type == "embedding"
    assert parse_lane("llm.fleet.offering.a.b.inference").usage_type == "inference"


@pytest.mark.parametrize(
    "key",
    [
        "",
        "llm.fleet",
        "llm.fleet.inference",
        "llm.request.ollama.chat.qwen3.5.27b",  # the legacy form
        "llm.fleet.image.m",
        "llm.fleet.embed.e5.ctx512",  # ctx only on inference
        "llm.fleet.inference.m.ctx0",
        "llm.fleet.inference.m.ctx012",
        "llm.fleet.inference.m.ctx-1",
        "llm.fleet.inference.Qwen",  # not a slug
        "llm.fleet.inference.m.ctx8.extra",
        "llm.fleet.inference.m.ctx8.boundary.dmz",  # no boundary or fingerprint segments (never built)
        "llm.fleet.inference.m.elig.abc123",
        "llm.fleet.inference.m.cap",
        "llm.fleet.offering.gpu.m",
        "llm.fleet.offering.gpu.m.chat",
        "llm.fleet.offering.gpu.m.inference.extra",
        "llm.fleet.inference..m",
        "llm.fleet.inference.m." + "x" * 300,
    ],
)
def test_parse_lane_refuses_malformed_keys(key: str) -> None:
    with pytest.raises(LaneError):
        parse_lane(key)


@given(
    model=st.text(min_size=1, max_size=40),
    window=st.one_of(st.none(), st.integers(min_value=1, max_value=10**7)),
    usage=st.sampled_from(["inference", "embedding"]),
    capabilities=st.sets(st.sampled_from(["tools", "vision"])),
)
def test_built_keys_parse_back(model: str, window: int | None, usage: str, capabilities: set[str]) -> None:
    if not slug(model):
        return
    key = shared_lane_key(model, usage, context_window=window, capabilities=capabilities)
    parsed = parse_lane(key)
    assert parsed.key == key
    assert parsed.model_slug == slug(model)
    assert parsed.context_window == (window if usage == "inference" else None)


# --- choosing a lane --------------------------------------------------------------------------------------

_LANES = [
    "llm.fleet.inference.qwen3-6-27b.ctx8192",
    "llm.fleet.inference.qwen3-6-27b.ctx32768",
    "llm.fleet.inference.qwen3-6-27b.ctx131072",
    "llm.fleet.embed.nomic-embed-text",
    "llm.fleet.offering.gpu-01.qwen3-6-27b.inference",
]


@pytest.mark.parametrize(
    ("needed", "expected"),
    [
        (1, "llm.fleet.inference.qwen3-6-27b.ctx8192"),
        (8192, "llm.fleet.inference.qwen3-6-27b.ctx8192"),
        (8193, "llm.fleet.inference.qwen3-6-27b.ctx32768"),
        (32768, "llm.fleet.inference.qwen3-6-27b.ctx32768"),
        (100_000, "llm.fleet.inference.qwen3-6-27b.ctx131072"),
    ],
)
def test_choose_smallest_fitting_lane(needed: int, expected: str) -> None:
    assert choose_lane(_LANES, needed) == expected
    assert choose_lane(reversed(_LANES), needed, model="qwen3.6:27b") == expected


def test_no_lane_fits() -> None:
    with pytest.raises(NoLaneError) as info:
        choose_lane(_LANES, 200_000, model="qwen3.6:27b")
    error = info.value
    assert isinstance(error, LaneError)
    assert isinstance(error, ValueError)
    assert error.model == "qwen3.6:27b"
    assert error.needed_context == 200_000
    assert error.available == (8192, 32768, 131072)
    assert "200000" in str(error)
    assert "ctx131072" in str(error)
    assert "qwen3.6:27b" in str(error)


def test_no_live_lane_for_model() -> None:
    with pytest.raises(NoLaneError, match="no live inference lane") as info:
        choose_lane(_LANES, 10, model="llama3")
    assert info.value.available == ()
    with pytest.raises(NoLaneError):
        choose_lane([], 10)


def test_choose_lane_needs_a_model_when_several_are_offered() -> None:
    lanes = [*_LANES, "llm.fleet.inference.llama3.ctx4096"]
    with pytest.raises(LaneError, match="several models"):
        choose_lane(lanes, 10)
    assert choose_lane(lanes, 10, model="llama3") == "llm.fleet.inference.llama3.ctx4096"


def test_choose_lane_ignores_embed_offering_and_windowless_lanes() -> None:
    lanes = ["llm.fleet.embed.m", "llm.fleet.offering.a.m.inference", "llm.fleet.inference.m"]
    with pytest.raises(NoLaneError):
        choose_lane(lanes, 1)


def test_choose_lane_accepts_lane_keys_and_offering_likes() -> None:
    @dataclass
    class Live:
        shared_lane: str

    candidates = [parse_lane("llm.fleet.inference.m.ctx4096"), Live("llm.fleet.inference.m.ctx2048")]
    assert choose_lane(candidates, 3000) == "llm.fleet.inference.m.ctx4096"
    assert choose_lane(candidates, 2000) == "llm.fleet.inference.m.ctx2048"


def test_choose_lane_refuses_garbage() -> None:
    with pytest.raises(LaneError):
        choose_lane(["not.a.lane"], 10)
    with pytest.raises(LaneError):
        choose_lane([42], 10)  # type: ignore[list-item]
    with pytest.raises(LaneError):
        choose_lane(_LANES, 0)


def test_duplicates_choose_the_same_lane() -> None:
    lanes = ["llm.fleet.inference.m.ctx4096"] * 3
    assert choose_lane(lanes, 4096) == "llm.fleet.inference.m.ctx4096"


# --- needed context and token estimates -------------------------------------------------------------------


def test_needed_context() -> None:
    assert needed_context(1000, 512) == 1512
    assert needed_context(1000, 0) == 1000
    assert needed_context(1000) == 1001  # room for at least one token when max_tokens is unbounded


@pytest.mark.parametrize(("prompt", "max_tokens"), [(-1, 1), (1, -1), (1.5, 1), (True, 1)])
def test_needed_context_refuses_bad_counts(prompt: object, max_tokens: object) -> None:
    with pytest.raises(LaneError):
        needed_context(prompt, max_tokens)  # type: ignore[arg-type]


def test_estimate_tokens_for_text() -> None:
    assert estimate_tokens("abcdef") == 2 + REPLY_PRIMING_TOKENS
    assert estimate_tokens("abcdefg") == 3 + REPLY_PRIMING_TOKENS
    assert estimate_tokens("") == REPLY_PRIMING_TOKENS


def test_estimate_tokens_for_messages() -> None:
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hello there, how are you?"},
    ]
    expected = (
        REPLY_PRIMING_TOKENS
        + 2 * MESSAGE_OVERHEAD_TOKENS
        + math.ceil(len("You are terse.") / 3)
        + math.ceil(len("Hello there, how are you?") / 3)
    )
    assert estimate_tokens(messages) == expected


def test_estimate_tokens_counts_parts_names_tool_calls_and_tools() -> None:
    plain = estimate_tokens([{"role": "user", "content": "describe"}])
    parts = estimate_tokens(
        [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "describe"},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64," + "A" * 10_000}},
                ],
            }
        ]
    )
    assert parts == plain  # image parts are not estimated (use /tokenize)
    named = estimate_tokens([{"role": "user", "content": "describe", "name": "alice"}])
    assert named > plain
    with_calls = estimate_tokens(
        [
            {"role": "user", "content": "describe"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}],
            },
            {"role": "tool", "tool_call_id": "c1", "content": "42"},
        ]
    )
    assert with_calls > plain + 2 * MESSAGE_OVERHEAD_TOKENS
    tools = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]
    assert estimate_tokens([{"role": "user", "content": "describe"}], tools=tools) > plain


def test_estimate_is_conservative_for_non_latin_text() -> None:
    text = "日本語のテキスト" * 10  # about one token a character on real tokenizers
    assert estimate_tokens(text) - REPLY_PRIMING_TOKENS >= len(text)


@given(st.text())
def test_estimate_never_undercounts_bytes_over_three(text: str) -> None:
    estimate = estimate_tokens([{"role": "user", "content": text}])
    floor = math.ceil(len(text.encode("utf-8")) / BYTES_PER_TOKEN_ESTIMATE)
    assert estimate >= floor + MESSAGE_OVERHEAD_TOKENS + REPLY_PRIMING_TOKENS


def test_capability_qualified_lanes_round_trip_and_are_chosen_only_when_asked() -> None:
    """``.cap.<caps>``: built sorted, parsed back, and chosen only for a request that needs exactly those."""
    from provider.fleet.lanes import capability_segment

    lane = shared_lane_key("tiny-llama", context_window=2048, capabilities=["vision", "tools"])
    assert lane == "llm.fleet.inference.tiny-llama.ctx2048.cap.tools-vision"
    parsed = parse_lane(lane)
    assert (parsed.capabilities, parsed.context_window, parsed.key) == ("tools-vision", 2048, lane)
    assert capability_segment([]) is None
    plain = shared_lane_key("tiny-llama", context_window=2048)
    tools = shared_lane_key("tiny-llama", context_window=2048, capabilities=["tools"])
    assert choose_lane([plain, tools], 100) == plain
    assert choose_lane([plain, tools], 100, capabilities=["tools"]) == tools
    with pytest.raises(NoLaneError):
        choose_lane([plain], 100, capabilities=["tools"])
