"""Lane keys: slugs, shared and offering keys, parsing, fingerprints, lane choice and token estimates."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass

import pytest
from hypothesis import given
from hypothesis import strategies as st

from provider.fleet.lanes import (
    BYTES_PER_TOKEN_ESTIMATE,
    FINGERPRINT_HEX_CHARS,
    MAX_PUBLIC_SEGMENT_CHARS,
    MESSAGE_OVERHEAD_TOKENS,
    REPLY_PRIMING_TOKENS,
    LaneError,
    LaneKey,
    NoLaneError,
    choose_lane,
    eligibility_fingerprint,
    estimate_tokens,
    lane_kind,
    looks_sensitive,
    needed_context,
    normalize_usage_type,
    offering_lane_key,
    parse_lane,
    public_segment,
    shared_lane_key,
    slug,
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


def test_boundary_and_fingerprint_segments_in_order() -> None:
    assert (
        shared_lane_key("qwen3.6:27b", "generation", context_window=32_768, boundary="corp_lan")
        == "llm.fleet.inference.qwen3-6-27b.ctx32768.boundary.corp-lan"
    )
    assert (
        shared_lane_key("qwen3.6:27b", "chat", context_window=32_768, fingerprint="abc123")
        == "llm.fleet.inference.qwen3-6-27b.ctx32768.elig.abc123"
    )
    assert (
        shared_lane_key("qwen3.6:27b", context_window=32_768, boundary="corp_lan", fingerprint="abc123")
        == "llm.fleet.inference.qwen3-6-27b.ctx32768.boundary.corp-lan.elig.abc123"
    )
    assert (
        shared_lane_key("---Qwen///3.6:::27B---", "chat", boundary="///corp---lan///")
        == "llm.fleet.inference.qwen-3-6-27b.boundary.corp-lan"
    )
    assert shared_lane_key("e5", "embed", boundary="dmz") == "llm.fleet.embed.e5.boundary.dmz"


def test_empty_model_is_refused() -> None:
    with pytest.raises(LaneError, match="model"):
        shared_lane_key(":::")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"boundary": "bearer_token"}, "boundary"),
        ({"boundary": "corp-auth"}, "boundary"),
        ({"boundary": "session-pool"}, "boundary"),
        ({"boundary": "my-cookie"}, "boundary"),
        ({"boundary": "jwt"}, "boundary"),
        ({"boundary": "Signature"}, "boundary"),
        ({"boundary": "db_password"}, "boundary"),
        ({"boundary": "aws-credentials"}, "boundary"),
        ({"boundary": "team-secret"}, "boundary"),
        ({"boundary": "APIKEY"}, "boundary"),
        ({"fingerprint": "api_key_v2"}, "eligibility fingerprint"),
        ({"fingerprint": "refresh-token"}, "eligibility fingerprint"),
    ],
)
def test_sensitive_public_segments_are_refused(kwargs: dict[str, str], match: str) -> None:
    with pytest.raises(LaneError, match=match) as info:
        shared_lane_key("qwen3.6:27b", **kwargs)
    assert "sensitive" in str(info.value)
    # the refused value itself is never echoed
    assert next(iter(kwargs.values())) not in str(info.value)


def test_oversized_public_segment_is_refused() -> None:
    with pytest.raises(LaneError, match="exceeds 64"):
        shared_lane_key("qwen3.6:27b", boundary="a" * 65)
    assert shared_lane_key("m", boundary="a" * 64).endswith("a" * MAX_PUBLIC_SEGMENT_CHARS)


def test_length_limit_applies_after_slugging() -> None:
    assert public_segment("a_" * 32 + "___", "boundary") == "-".join(["a"] * 32)


def test_empty_public_segment_is_refused() -> None:
    with pytest.raises(LaneError, match="boundary is empty"):
        shared_lane_key("m", boundary="///")


@pytest.mark.parametrize("word", ["monkey-island", "turkey", "tokenizer-x", "corp-lan", "gpu-pool", "eu-west-1"])
def test_harmless_segments_pass(word: str) -> None:
    assert not looks_sensitive(word)
    assert public_segment(word, "boundary") == slug(word)


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
            "llm.fleet.inference.qwen3-6-27b.ctx32768.boundary.corp-lan.elig.abc123",
            LaneKey(
                style="shared",
                kind="inference",
                model_slug="qwen3-6-27b",
                context_window=32768,
                boundary="corp-lan",
                fingerprint="abc123",
            ),
        ),
        (
            "llm.fleet.inference.qwen3-6-27b.elig.abc123",
            LaneKey(style="shared", kind="inference", model_slug="qwen3-6-27b", fingerprint="abc123"),
        ),
        (
            "llm.fleet.embed.e5.boundary.dmz",
            LaneKey(style="shared", kind="embed", model_slug="e5", boundary="dmz"),
        ),
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
        "llm.fleet.inference.m.elig.abc.boundary.dmz",  # wrong order
        "llm.fleet.inference.m.boundary",
        "llm.fleet.inference.m.boundary.bearer-token",
        "llm.fleet.inference.m.boundary." + "a" * 65,
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
    boundary=st.one_of(st.none(), st.sampled_from(["corp_lan", "dmz", "eu-west-1"])),
)
def test_built_keys_parse_back(model: str, window: int | None, usage: str, boundary: str | None) -> None:
    if not slug(model):
        return
    key = shared_lane_key(model, usage, context_window=window, boundary=boundary)
    parsed = parse_lane(key)
    assert parsed.key == key
    assert parsed.model_slug == slug(model)
    assert parsed.context_window == (window if usage == "inference" else None)


# --- eligibility fingerprint ------------------------------------------------------------------------------

_BASE = {
    "usage_type": "inference",
    "capabilities": ["chat", "tools"],
    "context_window": 32768,
    "max_output_tokens": 8192,
    "policy_tags": ["internal_only", "phi_allowed"],
}


def test_fingerprint_shape() -> None:
    fingerprint = eligibility_fingerprint(**_BASE)  # type: ignore[arg-type]
    assert len(fingerprint) == FINGERPRINT_HEX_CHARS == 16
    assert all(ch in "0123456789abcdef" for ch in fingerprint)
    assert public_segment(fingerprint, "eligibility fingerprint") == fingerprint


def test_fingerprint_is_sha256_of_canonical_json() -> None:
    document = {
        "capabilities": ["chat", "tools"],
        "context_window": 32768,
        "eligibility": {"ac_power": True, "zones": ["a", "b"]},
        "max_output_tokens": 8192,
        "policy_tags": ["internal_only", "phi_allowed"],
        "usage_type": "inference",
    }
    canonical = json.dumps(document, sort_keys=True, separators=(",", ":")).encode()
    expected = hashlib.sha256(canonical).hexdigest()[:16]
    got = eligibility_fingerprint(**_BASE, eligibility={"zones": ["b", "a"], "ac_power": True})  # type: ignore[arg-type]
    assert got == expected


def test_fingerprint_is_stable_under_ordering() -> None:
    first = eligibility_fingerprint(
        usage_type="chat",
        capabilities=["tools", "chat"],
        policy_tags=["b", "a"],
        eligibility={"boundary": "corp_lan", "zones": ["x", "y"], "nested": {"b": 1, "a": [3, 1, 2]}},
    )
    second = eligibility_fingerprint(
        usage_type="inference",
        capabilities=["chat", "tools", "chat"],
        policy_tags=["a", "b"],
        eligibility={"nested": {"a": [2, 1, 3], "b": 1}, "zones": ["y", "x"], "boundary": "corp_lan"},
    )
    assert first == second


@pytest.mark.parametrize(
    "change",
    [
        {"usage_type": "embedding"},
        {"capabilities": ["chat"]},
        {"context_window": 65536},
        {"max_output_tokens": 4096},
        {"policy_tags": ["internal_only"]},
        {"eligibility": {"ac_power": False}},
    ],
)
def test_fingerprint_changes_with_each_input(change: dict[str, object]) -> None:
    base = eligibility_fingerprint(**_BASE, eligibility={"ac_power": True})  # type: ignore[arg-type]
    changed = {**_BASE, "eligibility": {"ac_power": True}, **change}
    assert eligibility_fingerprint(**changed) != base  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("eligibility", "path"),
    [
        ({"endpoint_url": "gpu"}, "eligibility.endpoint_url"),
        ({"nested": {"Authorization": "x"}}, "eligibility.nested.Authorization"),
        ({"nested": {"api_key_v2": "abc123"}}, "eligibility.nested.api_key_v2"),
        ({"nested": {"x_api_key": "def456"}}, "eligibility.nested.x_api_key"),
        ({"nested": {"bearer_token": "ghi789"}}, "eligibility.nested.bearer_token"),
        ({"nested": {"client_secret": "s"}}, "eligibility.nested.client_secret"),
        ({"nested": {"refresh_token": "r"}}, "eligibility.nested.refresh_token"),
        ({"deep": [{"ok": 1}, {"password": "p"}]}, "eligibility.deep.1.password"),
        ({"prompt": "hello"}, "eligibility.prompt"),
        ({"model_path": "/models/x"}, "eligibility.model_path"),
        ({"path": "/models/x"}, "eligibility.path"),
        ({"weights_dir": "models"}, "eligibility.weights_dir"),
        ({"source_uri": "s3-bucket"}, "eligibility.source_uri"),
        ({"system_prompt": "be nice"}, "eligibility.system_prompt"),
        ({"ip": "10.0.0.5"}, "eligibility.ip"),
        ({"hostName": "gpu-01"}, "eligibility.hostName"),
        ({"host": "gpu-01"}, "eligibility.host"),
        ({"instance_id": "gpu-01"}, "eligibility.instance_id"),
        ({"user": "alice"}, "eligibility.user"),
        ({"mirror": "https://gpu.internal"}, "eligibility.mirror"),
        ({"note": "Bearer abc.def"}, "eligibility.note"),
        ({"blob": "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ4In0.sig"}, "eligibility.blob"),
    ],
)
def test_fingerprint_refuses_sensitive_and_identity_content(eligibility: dict[str, object], path: str) -> None:
    with pytest.raises(LaneError) as info:
        eligibility_fingerprint(usage_type="inference", capabilities=["chat"], eligibility=eligibility)
    assert path in str(info.value)
    for value in ("abc123", "def456", "ghi789", "gpu.internal", "alice"):
        assert value not in str(info.value)


def test_fingerprint_refuses_values_json_cannot_carry() -> None:
    with pytest.raises(LaneError, match="canonical JSON"):
        eligibility_fingerprint(usage_type="inference", eligibility={"when": object()})


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


def test_choose_lane_matches_boundary_and_fingerprint_exactly() -> None:
    lanes = [
        "llm.fleet.inference.m.ctx4096.boundary.corp-lan",
        "llm.fleet.inference.m.ctx8192",
        "llm.fleet.inference.m.ctx2048.elig.abc123",
    ]
    assert choose_lane(lanes, 100) == "llm.fleet.inference.m.ctx8192"
    assert choose_lane(lanes, 100, boundary="corp_lan") == "llm.fleet.inference.m.ctx4096.boundary.corp-lan"
    assert choose_lane(lanes, 100, fingerprint="abc123") == "llm.fleet.inference.m.ctx2048.elig.abc123"


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
