"""Registry events: shape, types, timestamps, the sanitizer and the JSON wire form."""

from __future__ import annotations

import copy
import dataclasses
import json
import re
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest

from provider.fleet.events import (
    EVENT_TYPES,
    REGISTRY_EXCHANGE,
    SENSITIVE_KEYS,
    RegistryEvent,
    RegistryEventError,
    UnknownEventTypeError,
    UnsafeEventError,
    format_timestamp,
    is_sensitive_key,
    normalize_key,
    scrub_text,
    unsafe_value_reason,
)
from provider.fleet.offerings import Offering

SECRET = "sk-PLANTED-7f3a9c"
TIMESTAMP = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}Z$")


def offering() -> Offering:
    """The seeds' offering example."""
    return Offering.model_validate(
        {
            "offering_id": "ollama:macbook_m4_max:inference:qwen3-6-27b-q4-k-m",
            "provider_family": "ollama",
            "provider_instance": "macbook_m4_max",
            "transport": "local",
            "tier": "local",
            "model": "qwen3.6:27b-q4_K_M",
            "capabilities": ["chat", "tools", "vision", "thinking"],
            "limits": {"context_window": 32_768, "max_output_tokens": 8_192},
            "health": {"ready": True, "latency_ms": 180},
            "policy_tags": ["internal_only", "phi_allowed"],
            "metadata": {"enabled": True, "eligibility": {"ac_power": True}},
        }
    )


def seed_event(**overrides: Any) -> RegistryEvent:
    """The seeds' RegistryEvent.available example."""
    sections: dict[str, Any] = {
        "runtime": {"host_id": "macbook-m4-max", "process": {"pid": 12_345}},
        "capacity": {"concurrency": 4, "queued": 0},
        "health": {"ready": True, "latency_ms": 180},
        "lane": offering().shared_lane,
        "metadata": {"observed_by": "lex_llm_ollama"},
    }
    sections.update(overrides)
    return RegistryEvent.available(offering(), **sections)


# --- shape ------------------------------------------------------------------------------------------------


def test_seed_example_shape() -> None:
    body = seed_event().to_dict()
    assert list(body) == [
        "event_id",
        "event_type",
        "occurred_at",
        "offering",
        "runtime",
        "capacity",
        "health",
        "lane",
        "metadata",
    ]
    assert body["event_type"] == "offering_available"
    assert body["offering"] == offering().model_dump(mode="json")
    assert body["runtime"] == {"host_id": "macbook-m4-max", "process": {"pid": 12_345}}
    assert body["lane"] == "llm.fleet.inference.qwen3-6-27b-q4-k-m.ctx32768"
    assert TIMESTAMP.match(body["occurred_at"])
    assert len(body["event_id"]) == 36


def test_nil_sections_are_dropped() -> None:
    body = RegistryEvent.heartbeat(offering()).to_dict()
    assert set(body) == {"event_id", "event_type", "occurred_at", "offering"}
    assert "null" not in json.dumps({k: v for k, v in body.items() if k != "offering"})


def test_nested_nils_are_kept() -> None:
    event = seed_event(health={"ready": True, "latency_ms": None})
    assert event.to_dict()["health"] == {"ready": True, "latency_ms": None}


@pytest.mark.parametrize(
    ("factory", "event_type"),
    [
        (RegistryEvent.available, "offering_available"),
        (RegistryEvent.unavailable, "offering_unavailable"),
        (RegistryEvent.degraded, "offering_degraded"),
        (RegistryEvent.heartbeat, "offering_heartbeat"),
    ],
)
def test_every_event_type(factory: Any, event_type: str) -> None:
    event = factory(offering())
    assert event.event_type == event_type
    assert event.routing_key == f"llm.registry.{event_type}"
    assert RegistryEvent.build(event_type, offering()).event_type == event_type


def test_event_types_and_exchange() -> None:
    assert set(EVENT_TYPES) == {
        "offering_available",
        "offering_unavailable",
        "offering_degraded",
        "offering_heartbeat",
    }
    assert REGISTRY_EXCHANGE == "llm.registry"


@pytest.mark.parametrize("event_type", ["offering_exploded", "available", "OFFERING_AVAILABLE", "", "model_available"])
def test_unknown_event_types_are_refused(event_type: str) -> None:
    with pytest.raises(UnknownEventTypeError) as info:
        RegistryEvent.build(event_type, offering())
    assert isinstance(info.value, RegistryEventError)
    assert isinstance(info.value, ValueError)
    with pytest.raises(UnknownEventTypeError):
        RegistryEvent(event_type=event_type, offering={"offering_id": "x"})  # type: ignore[arg-type]
    body = seed_event().to_dict()
    body["event_type"] = event_type
    with pytest.raises(UnknownEventTypeError):
        RegistryEvent.from_dict(body)


def test_offering_may_be_a_mapping() -> None:
    event = RegistryEvent.available({"offering_id": "vllm:gpu1:inference:m", "model": "m"})
    assert event.offering == {"offering_id": "vllm:gpu1:inference:m", "model": "m"}


def test_an_offering_is_required() -> None:
    with pytest.raises(RegistryEventError, match="offering"):
        RegistryEvent.available({})
    with pytest.raises(RegistryEventError, match="offering"):
        RegistryEvent.available({"api_key": SECRET})  # empty once sanitized


def test_events_are_immutable() -> None:
    event = seed_event()
    with pytest.raises(dataclasses.FrozenInstanceError):
        event.event_type = "offering_degraded"  # type: ignore[misc]


def test_explicit_id_and_time() -> None:
    moment = datetime(2026, 5, 9, 7, 35, 25, 123456, tzinfo=UTC)
    event = RegistryEvent.available(offering(), event_id="evt-1", occurred_at=moment)
    assert event.to_dict()["event_id"] == "evt-1"
    assert event.to_dict()["occurred_at"] == "2026-05-09T07:35:25.123456Z"


# --- timestamps -------------------------------------------------------------------------------------------


def test_timestamps_are_utc_with_microseconds() -> None:
    plus_two = timezone(timedelta(hours=2))
    assert format_timestamp(datetime(2026, 5, 9, 9, 0, 0, tzinfo=plus_two)) == "2026-05-09T07:00:00.000000Z"
    event = RegistryEvent.available(offering(), occurred_at=datetime(2026, 5, 9, 9, 0, 0, 5, tzinfo=plus_two))
    assert event.occurred_at.tzinfo == UTC
    assert event.to_dict()["occurred_at"] == "2026-05-09T07:00:00.000005Z"


def test_naive_timestamps_are_refused() -> None:
    with pytest.raises(RegistryEventError, match="timezone-aware"):
        format_timestamp(datetime(2026, 5, 9))
    with pytest.raises(RegistryEventError, match="timezone-aware"):
        RegistryEvent.available(offering(), occurred_at=datetime(2026, 5, 9))
    body = seed_event().to_dict()
    body["occurred_at"] = "2026-05-09T07:00:00"
    with pytest.raises(RegistryEventError, match="timezone-aware"):
        RegistryEvent.from_dict(body)
    body["occurred_at"] = "yesterday"
    with pytest.raises(RegistryEventError, match="ISO 8601"):
        RegistryEvent.from_dict(body)


# --- sensitive keys ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", sorted(SENSITIVE_KEYS))
def test_listed_keys_are_sensitive(key: str) -> None:
    assert is_sensitive_key(key)
    assert is_sensitive_key(key.upper())
    assert is_sensitive_key(key.replace("_", "-"))


@pytest.mark.parametrize(
    "key",
    [
        "x_api_key",
        "refresh_token",
        "bearer_token",
        "db_password",
        "aws_secret",
        "signing_key",
        "apiKey",
        "AccessKey",
        "replyTo",
        "Endpoint-URL",
        "API-KEY",
        "Authorization",
        "access token",
    ],
)
def test_derived_keys_are_sensitive(key: str) -> None:
    assert is_sensitive_key(key)


@pytest.mark.parametrize(
    "key",
    [
        "max_tokens",
        "prompt_tokens",
        "tokens_per_second",
        "keyboard",
        "monkey",
        "key_count",
        "host_id",
        "latency_ms",
        "offering_id",
        "lane",
        "pathway",
        "urls_seen",
    ],
)
def test_ordinary_keys_are_not_sensitive(key: str) -> None:
    assert not is_sensitive_key(key)


def test_normalize_key() -> None:
    assert normalize_key("apiKey") == "api_key"
    assert normalize_key("Endpoint-URL") == "endpoint_url"
    assert normalize_key(" Reply To ") == "reply_to"
    assert normalize_key("HTTPServer") == "httpserver"


# --- the offering: sensitive keys dropped at any depth ----------------------------------------------------


def planted_offering() -> dict[str, Any]:
    """An offering mapping with secrets planted at several depths."""
    body = offering().model_dump(mode="json")
    body["api_key"] = SECRET
    body["metadata"] = {
        "eligibility": {"ac_power": True, "client_secret": SECRET},
        "endpoint": "gpu.internal",
        "deeper": {"still": {"x-api-token": SECRET, "kept": 1}},
        "replicas": [{"name": "a", "password": SECRET}, {"name": "b", "privateKey": SECRET}],
        "prompt": "what did the patient say",
        "path": "/models/qwen",
    }
    body["health"] = {"ready": True, "Authorization": SECRET}
    return body


def test_offering_secrets_are_dropped_at_any_depth() -> None:
    source = planted_offering()
    before = copy.deepcopy(source)
    event = RegistryEvent.available(source)
    wire = event.to_json()
    assert SECRET not in wire
    assert "patient" not in wire
    assert "/models/qwen" not in wire
    assert "gpu.internal" not in wire
    metadata = event.offering["metadata"]
    assert metadata["eligibility"] == {"ac_power": True}
    assert metadata["deeper"] == {"still": {"kept": 1}}
    assert metadata["replicas"] == [{"name": "a"}, {"name": "b"}]
    assert event.offering["health"] == {"ready": True}
    assert event.offering["model"] == "qwen3.6:27b-q4_K_M"
    assert source == before  # the caller's mapping is left alone


def test_offering_object_with_planted_metadata() -> None:
    planted = offering().model_copy(update={"metadata": {"eligibility": {"api_key": SECRET}, "zone": "a"}})
    event = RegistryEvent.degraded(planted)
    assert SECRET not in event.to_json()
    assert event.offering["metadata"] == {"eligibility": {}, "zone": "a"}


def test_urls_in_the_offering_are_refused_not_dropped() -> None:
    body = offering().model_dump(mode="json")
    body["metadata"] = {"mirror": "https://gpu.internal:8000/v1"}
    with pytest.raises(UnsafeEventError) as info:
        RegistryEvent.available(body)
    assert info.value.path == "offering.metadata.mirror"
    assert "gpu.internal" not in str(info.value)


# --- other sections: sensitive keys make the event invalid ------------------------------------------------


@pytest.mark.parametrize(
    ("section", "value", "path"),
    [
        ("runtime", {"token": SECRET}, "runtime.token"),
        ("runtime", {"process": {"pid": 1, "api_key": SECRET}}, "runtime.process.api_key"),
        ("runtime", {"workers": [{"id": 1}, {"reply_to": SECRET}]}, "runtime.workers.1.reply_to"),
        ("capacity", {"concurrency": 4, "access_key": SECRET}, "capacity.access_key"),
        (
            "capacity",
            {"pool": {"inner": {"deep": {"session_token": SECRET}}}},
            "capacity.pool.inner.deep.session_token",
        ),
        ("health", {"ready": False, "endpoint_url": SECRET}, "health.endpoint_url"),
        ("health", {"checks": {"url": SECRET}}, "health.checks.url"),
        ("metadata", {"credentials": {"user": "x"}}, "metadata.credentials"),
        ("metadata", {"prompt": SECRET}, "metadata.prompt"),
        ("metadata", {"nested": {"Bearer": SECRET}}, "metadata.nested.Bearer"),
        ("metadata", {"model_path": SECRET}, None),  # not a listed key: allowed (values are still checked)
    ],
)
def test_sensitive_keys_elsewhere_refuse_the_event(section: str, value: dict[str, Any], path: str | None) -> None:
    if path is None:
        assert RegistryEvent.available(offering(), **{section: value}).to_dict()[section] == value
        return
    with pytest.raises(UnsafeEventError) as info:
        RegistryEvent.available(offering(), **{section: value})
    assert info.value.path == path
    assert path in str(info.value)
    assert SECRET not in str(info.value)


# --- values: URLs, bearer credentials and JWTs refused everywhere -----------------------------------------

JWT = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U"


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("http://10.0.0.5:8000", "a URL"),
        ("connect failed: https://gpu.internal/v1/models", "a URL"),
        ("amqps://user:pw@rabbit:5671//", "a URL"),
        ("redis://127.0.0.1:6379/0", "a URL"),
        ("Bearer abc123", "a bearer credential"),
        ("header was bearer   xyz", "a bearer credential"),
        (JWT, "a JWT"),
        (f"token={JWT}", "a JWT"),
        ("fine", None),
        ("ratio 3:1", None),
        ("bearer", None),
        ("eyJ-not-a-jwt", None),
    ],
)
def test_unsafe_value_reason(text: str, reason: str | None) -> None:
    assert unsafe_value_reason(text) == reason


@pytest.mark.parametrize(
    ("section", "value", "path"),
    [
        ("runtime", {"host": "http://10.0.0.5:8000"}, "runtime.host"),
        ("health", {"error": "GET https://gpu.internal/health failed"}, "health.error"),
        ("metadata", {"notes": ["ok", f"Bearer {SECRET}"]}, "metadata.notes.1"),
        ("capacity", {"deep": {"deeper": {"blob": JWT}}}, "capacity.deep.deeper.blob"),
        ("lane", "http://evil/llm.fleet.inference.m", "lane"),
    ],
)
def test_unsafe_values_refuse_the_event(section: str, value: Any, path: str) -> None:
    with pytest.raises(UnsafeEventError) as info:
        RegistryEvent.available(offering(), **{section: value})
    assert info.value.path == path
    assert SECRET not in str(info.value)
    assert "gpu.internal" not in str(info.value)


def test_scrub_text_makes_error_messages_safe() -> None:
    message = f"GET https://gpu.internal:8000/v1/models failed; Authorization: Bearer {SECRET}; jwt {JWT}"
    scrubbed = scrub_text(message)
    assert unsafe_value_reason(scrubbed) is None
    assert SECRET not in scrubbed
    assert "gpu.internal" not in scrubbed
    assert scrubbed.startswith("GET [redacted] failed")
    event = RegistryEvent.unavailable(offering(), health={"ready": False, "error": scrubbed})
    assert event.health == {"ready": False, "error": scrubbed}


# --- values JSON cannot carry -----------------------------------------------------------------------------


def test_non_json_values_are_refused() -> None:
    with pytest.raises(RegistryEventError, match="JSON"):
        RegistryEvent.available(offering(), metadata={"when": datetime.now(UTC)})
    with pytest.raises(RegistryEventError, match="not a string"):
        RegistryEvent.available(offering(), metadata={1: "x"})
    with pytest.raises(RegistryEventError, match="mapping"):
        RegistryEvent.available(offering(), runtime=["x"])  # type: ignore[arg-type]


def test_tuples_and_sets_become_lists() -> None:
    event = RegistryEvent.available(offering(), metadata={"pair": (1, 2), "tags": {"b", "a"}})
    assert event.metadata == {"pair": [1, 2], "tags": ["a", "b"]}


# --- JSON wire form ---------------------------------------------------------------------------------------


def test_json_round_trip() -> None:
    event = seed_event()
    text = event.to_json()
    assert json.loads(text) == event.to_dict()
    again = RegistryEvent.from_json(text)
    assert again == event
    assert again.to_json() == text
    assert RegistryEvent.from_json(text.encode()) == event
    assert Offering.model_validate(again.offering) == offering()


def test_from_json_sanitizes_like_build() -> None:
    body = seed_event().to_dict()
    body["offering"] = planted_offering()
    event = RegistryEvent.from_json(json.dumps(body))
    assert SECRET not in event.to_json()
    body["runtime"] = {"process": {"token": SECRET}}
    with pytest.raises(UnsafeEventError) as info:
        RegistryEvent.from_json(json.dumps(body))
    assert info.value.path == "runtime.process.token"


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"schema_version": 1}, "unknown registry event fields"),
        ({"event_id": None}, "event_id"),
        ({"occurred_at": None}, "occurred_at"),
        ({"offering": None}, "offering"),
        ({"event_type": None}, "event_type"),
        ({"event_id": "  "}, "event_id"),
        ({"lane": 7}, "lane"),
    ],
)
def test_from_dict_refuses_malformed_events(change: dict[str, Any], match: str) -> None:
    body = {**seed_event().to_dict(), **change}
    with pytest.raises(RegistryEventError, match=match):
        RegistryEvent.from_dict(body)


def test_from_json_refuses_garbage() -> None:
    with pytest.raises(RegistryEventError, match="not valid JSON"):
        RegistryEvent.from_json("{nope")
    with pytest.raises(RegistryEventError, match="JSON object"):
        RegistryEvent.from_json("[1, 2]")
