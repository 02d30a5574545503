"""Offerings: one model on one instance for one usage, the unit the fleet routes, filters and names lanes by.

An :class:`Offering` is immutable, round-trips through JSON (the registry keeps them in Redis), knows its
lane keys and answers ``eligible_for``. :func:`offerings_for_instance` turns one vLLM server's
``/v1/models`` answer into its offerings.
"""

from __future__ import annotations

import fnmatch
import itertools
from collections.abc import Iterable, Mapping
from typing import Any, Final, Literal, cast, get_args

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from provider.fleet.lanes import (
    LaneStyle,
    UsageType,
    normalize_usage_type,
    offering_lane_key,
    shared_lane_key,
    slug,
)
from provider.settings import InstanceSettings, Tier

__all__ = [
    "CAPABILITY_ALIASES",
    "DEFAULT_TRANSPORT",
    "HEALTH_STATUSES",
    "LANE_CAPABILITIES",
    "PROVIDER_FAMILY",
    "HealthStatus",
    "Offering",
    "Transport",
    "canonical_alias_for",
    "default_offering_id",
    "model_allowed",
    "normalize_capabilities",
    "normalize_capability",
    "normalize_usage_type",
    "offerings_for_instance",
    "tier_for_transport",
    "vllm_capabilities",
]

PROVIDER_FAMILY: Final = "vllm"
DEFAULT_TRANSPORT: Final = "http"
DEFAULT_TIER: Final = "private"

Transport = Literal["local", "http", "rabbitmq", "sdk"]
HealthStatus = Literal["available", "degraded", "unavailable"]
HEALTH_STATUSES: Final[tuple[str, ...]] = get_args(HealthStatus)

_TIER_FOR_TRANSPORT: Final[Mapping[str, Tier]] = {"local": "local", "rabbitmq": "fleet"}

CAPABILITY_ALIASES: Final[Mapping[str, str]] = {
    "function_calling": "tools",
    "tool_use": "tools",
    "tool_calls": "tools",
    "tool": "tools",
    "functions": "tools",
    "stream": "streaming",
    "stream_chat": "streaming",
    "embeddings": "embedding",
    "embed": "embedding",
    "reasoning": "thinking",
    "image_generation": "image",
    "images": "image",
}
EMBEDDING_CAPABILITY: Final = "embedding"
# Capabilities some instances of a model have and others lack (a tool-call parser, a vision encoder): a request
# needing them is routed to a lane qualified by them (``.cap.<caps>``), consumed only by instances that have them.
LANE_CAPABILITIES: Final = ("tools", "vision")
CHAT_CAPABILITIES: Final = ("chat", "streaming")

# What a model entry may say about itself to mark it as an embedding (pooling) model; /v1/models says nothing.
_EMBEDDING_KINDS: Final = frozenset({"embedding", "embeddings", "embed", "pooling"})
_MAX_PARENT_DEPTH: Final = 8


def normalize_capability(name: str) -> str:
    """One capability name: lower-case, ``-`` as ``_``, aliases folded (``function_calling`` → ``tools``)."""
    normalized = str(name).strip().lower().replace("-", "_").replace(" ", "_")
    return CAPABILITY_ALIASES.get(normalized, normalized)


def normalize_capabilities(names: Iterable[str] | str | None) -> tuple[str, ...]:
    """Capability names normalized, de-duplicated and sorted (empty names dropped)."""
    if names is None:
        return ()
    if isinstance(names, str):
        names = [names]
    return tuple(sorted({cap for cap in (normalize_capability(name) for name in names) if cap}))


def _normalize_tags(tags: Iterable[str] | str | None) -> tuple[str, ...]:
    """Policy tags trimmed, de-duplicated and sorted."""
    if tags is None:
        return ()
    if isinstance(tags, str):
        tags = [tags]
    return tuple(sorted({str(tag).strip() for tag in tags if str(tag).strip()}))


def tier_for_transport(transport: str) -> Tier:
    """``local`` for the local transport, ``fleet`` for rabbitmq, ``private`` otherwise."""
    return _TIER_FOR_TRANSPORT.get(transport, DEFAULT_TIER)


def canonical_alias_for(
    model: str,
    aliases: Mapping[str, Mapping[str, str]] | None,
    provider: str | None = None,
) -> str:
    """The first alias mapping exactly this model id (for ``provider`` if given), else the model trimmed."""
    for alias, targets in (aliases or {}).items():
        if provider is not None:
            if targets.get(provider) == model:
                return alias
        elif model in targets.values():
            return alias
    return model.strip()


def default_offering_id(provider_family: str, instance_id: str, usage_type: str, alias_or_model: str) -> str:
    """``<family>:<instance>:<usage>:<alias-or-model>``, each part slugged."""
    parts = [
        slug(provider_family),
        slug(instance_id),
        slug(normalize_usage_type(usage_type)),
        slug(alias_or_model),
    ]
    if not all(parts):
        raise ValueError("an offering id needs a family, an instance, a usage and a model that slug to something")
    return ":".join(parts)


def model_allowed(model: str, allow: Iterable[str] = (), deny: Iterable[str] = (), *, alias: str | None = None) -> bool:
    """Whether a model passes fnmatch allow/deny patterns, tried on its id and its alias; deny wins."""
    names = [model] if alias is None or alias == model else [model, alias]
    allow, deny = list(allow), list(deny)

    def matches(patterns: list[str]) -> bool:
        return any(fnmatch.fnmatchcase(name, pattern) for name in names for pattern in patterns)

    if deny and matches(deny):
        return False
    return not allow or matches(allow)


def vllm_capabilities(*, embedding: bool, extra: Iterable[str] = ()) -> tuple[str, ...]:
    """An embedding model embeds (never chats or streams); any other chats and streams; plus ``extra``."""
    capabilities = set(normalize_capabilities(list(extra)))
    if embedding:
        capabilities.add(EMBEDDING_CAPABILITY)
        capabilities.difference_update(CHAT_CAPABILITIES)
    else:
        capabilities.update(CHAT_CAPABILITIES)
    return tuple(sorted(capabilities))


class Offering(BaseModel):
    """One model on one instance for one usage; immutable, JSON round-trips, knows its lanes."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    offering_id: str = Field(default="", min_length=1)
    provider_family: str = Field(default=PROVIDER_FAMILY, min_length=1)
    instance_id: str = Field(default="", min_length=1)
    transport: Transport = DEFAULT_TRANSPORT
    tier: Tier = DEFAULT_TIER
    model: str = Field(min_length=1)
    canonical_alias: str = Field(default="", min_length=1)
    model_family: str | None = None
    usage_type: UsageType = "inference"
    capabilities: tuple[str, ...] = ()
    context_window: int | None = Field(default=None, ge=1)
    max_input_tokens: int | None = Field(default=None, ge=1)
    max_output_tokens: int | None = Field(default=None, ge=1)
    policy_tags: tuple[str, ...] = ()
    enabled: bool = True
    health: dict[str, Any] = Field(default_factory=lambda: {"status": "available"})
    routing_metadata: dict[str, Any] = Field(default_factory=dict)
    metadata: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _fill_defaults(cls, data: Any) -> Any:
        """Accept the seeds' field names, normalize names, and derive every default the protocol defines."""
        if not isinstance(data, Mapping):
            return data
        data = dict(data)
        for seed_name, name in (
            ("provider_instance", "instance_id"),
            ("canonical_model_alias", "canonical_alias"),
        ):
            if seed_name in data:
                value = data.pop(seed_name)
                if data.get(name) is None:
                    data[name] = value
        limits = data.pop("limits", None)
        if isinstance(limits, Mapping):
            for name in ("context_window", "max_input_tokens", "max_output_tokens"):
                if data.get(name) is None and limits.get(name) is not None:
                    data[name] = limits[name]
        metadata = data.get("metadata")
        if "enabled" not in data and isinstance(metadata, Mapping) and isinstance(metadata.get("enabled"), bool):
            data["enabled"] = metadata["enabled"]

        family = str(data.get("provider_family") or PROVIDER_FAMILY).strip()
        data["provider_family"] = family
        data["instance_id"] = str(data.get("instance_id") or family).strip()
        capabilities = normalize_capabilities(data.get("capabilities"))
        data["capabilities"] = capabilities
        usage = data.get("usage_type")
        if usage:
            data["usage_type"] = normalize_usage_type(str(usage))
        else:
            data["usage_type"] = "embedding" if EMBEDDING_CAPABILITY in capabilities else "inference"
        transport = data.get("transport") or DEFAULT_TRANSPORT
        data["transport"] = transport
        if not data.get("tier"):
            data["tier"] = tier_for_transport(str(transport))
        data["policy_tags"] = _normalize_tags(data.get("policy_tags"))
        model = data.get("model")
        if isinstance(model, str) and model.strip():
            alias = str(data.get("canonical_alias") or "").strip() or model.strip()
            data["canonical_alias"] = alias
            if not data.get("offering_id"):
                data["offering_id"] = default_offering_id(family, data["instance_id"], data["usage_type"], alias)
        return data

    @field_validator("health")
    @classmethod
    def _known_status(cls, health: dict[str, Any]) -> dict[str, Any]:
        """A health status, when given, is available, degraded or unavailable."""
        status = health.get("status")
        if status is not None and status not in HEALTH_STATUSES:
            raise ValueError(f"health status must be one of {', '.join(HEALTH_STATUSES)}")
        return health

    @property
    def status(self) -> HealthStatus:
        """The health status (``unavailable`` when only ``ready: false`` is known, else ``available``)."""
        status = self.health.get("status")
        if status in HEALTH_STATUSES:
            return cast(HealthStatus, status)
        return "unavailable" if self.health.get("ready") is False else "available"

    @property
    def shared_lane(self) -> str:
        """``llm.fleet.<embed|inference>.<alias-slug>[.ctx<N>]``."""
        return shared_lane_key(
            self.canonical_alias,
            self.usage_type,
            context_window=self.context_window,
            max_input_tokens=self.max_input_tokens,
        )

    @property
    def offering_lane(self) -> str:
        """``llm.fleet.offering.<instance-slug>.<alias-slug>.<embed|inference>``."""
        return offering_lane_key(self.instance_id, self.canonical_alias, self.usage_type)

    def lane(
        self,
        style: LaneStyle = "shared",
        *,
        capabilities: Iterable[str] = (),
    ) -> str:
        """The lane of a style; a shared lane may add lane capabilities. Asking for capabilities this offering
        lacks is a ``ValueError``."""
        if style == "offering":
            return self.offering_lane
        if style != "shared":
            raise ValueError(f"unknown lane style {style!r}; expected shared or offering")
        wanted = normalize_capabilities(list(capabilities))
        if not set(wanted) <= set(self.capabilities):
            missing = ", ".join(sorted(set(wanted) - set(self.capabilities)))
            raise ValueError(f"offering {self.offering_id} lacks {missing}")
        return shared_lane_key(
            self.canonical_alias,
            self.usage_type,
            context_window=self.context_window,
            max_input_tokens=self.max_input_tokens,
            capabilities=wanted,
        )

    @property
    def lane_capabilities(self) -> tuple[str, ...]:
        """The capabilities of this offering that qualify lanes (see ``LANE_CAPABILITIES``)."""
        return tuple(cap for cap in LANE_CAPABILITIES if cap in self.capabilities)

    def capability_lanes(self) -> list[str]:
        """The shared lanes qualified by each non-empty set of this offering's lane capabilities."""
        own = self.lane_capabilities
        return [
            self.lane("shared", capabilities=combination)
            for size in range(1, len(own) + 1)
            for combination in itertools.combinations(own, size)
        ]

    def eligible_for(
        self,
        usage_type: str | None = None,
        required_capabilities: Iterable[str] = (),
        min_context_window: int | None = None,
        policy_tags: Iterable[str] = (),
    ) -> bool:
        """Enabled, usage matches (or none asked), capabilities and tags present, window ≥ the minimum."""
        if not self.enabled:
            return False
        if usage_type is not None and normalize_usage_type(usage_type) != self.usage_type:
            return False
        if not set(normalize_capabilities(list(required_capabilities))) <= set(self.capabilities):
            return False
        if min_context_window is not None and (self.context_window is None or self.context_window < min_context_window):
            return False
        return set(_normalize_tags(list(policy_tags))) <= set(self.policy_tags)


def _entry_value(entry: Mapping[str, Any] | object, *names: str) -> Any:
    """The first non-None field of a model entry, read from a mapping or attributes."""
    for name in names:
        value = entry.get(name) if isinstance(entry, Mapping) else getattr(entry, name, None)
        if value is not None:
            return value
    return None


def _entry_window(entry: Mapping[str, Any] | object) -> int | None:
    """A model entry's own context window (``max_model_len``, else ``context_window``)."""
    window = _entry_value(entry, "max_model_len", "context_window", "context_length")
    return window if isinstance(window, int) and not isinstance(window, bool) and window > 0 else None


def _inherited_window(model_id: str, entries: Mapping[str, Mapping[str, Any] | object]) -> int | None:
    """A model's context window; a LoRA adapter (no window, a parent) takes its parent's, up the chain."""
    seen: set[str] = set()
    current: str | None = model_id
    while current is not None and current in entries and current not in seen and len(seen) < _MAX_PARENT_DEPTH:
        seen.add(current)
        window = _entry_window(entries[current])
        if window is not None:
            return window
        parent = _entry_value(entries[current], "parent")
        current = parent if isinstance(parent, str) else None
    return None


def _entry_is_embedding(entry: Mapping[str, Any] | object) -> bool:
    """Whether a model entry says it is an embedding (pooling) model."""
    if _entry_value(entry, "is_embedding") is True:
        return True
    kind = _entry_value(entry, "kind", "usage_type")
    return isinstance(kind, str) and kind.strip().lower() in _EMBEDDING_KINDS


def offerings_for_instance(
    instance: InstanceSettings,
    models: Iterable[Mapping[str, Any] | object],
    aliases: Mapping[str, Mapping[str, str]] | None = None,
    *,
    allow: Iterable[str] = (),
    deny: Iterable[str] = (),
    health: Mapping[str, Any] | None = None,
    provider_family: str = PROVIDER_FAMILY,
) -> list[Offering]:
    """One offering per model a vLLM instance serves, past the global and the instance's allow/deny.

    ``models`` are /v1/models entries (``id``, ``max_model_len``, ``parent``) or objects with those
    attributes; an entry marks an embedding model with ``is_embedding`` or ``kind``, or the settings give it
    the ``embedding`` capability. Patterns are fnmatch, tried on the id and the canonical alias; deny wins.
    A disabled instance, or one without a URL, offers nothing.
    """
    if not instance.usable:
        return []
    entries: dict[str, Mapping[str, Any] | object] = {}
    for entry in models:
        model_id = _entry_value(entry, "id", "model")
        if isinstance(model_id, str) and model_id.strip() and model_id not in entries:
            entries[model_id] = entry
    global_allow, global_deny = list(allow), list(deny)
    instance_id = instance.name or provider_family
    offerings: list[Offering] = []
    for model_id, entry in entries.items():
        alias = canonical_alias_for(model_id, aliases, provider_family)
        if not (
            model_allowed(model_id, global_allow, global_deny, alias=alias)
            and model_allowed(model_id, instance.allow_models, instance.deny_models, alias=alias)
        ):
            continue
        parent = _entry_value(entry, "parent")
        configured = instance.model_capabilities.get(model_id) or instance.model_capabilities.get(alias)
        if configured is None and isinstance(parent, str):
            configured = instance.model_capabilities.get(parent)
        extra = normalize_capabilities(configured or ())
        embedding = _entry_is_embedding(entry) or EMBEDDING_CAPABILITY in extra
        offerings.append(
            Offering(
                provider_family=provider_family,
                instance_id=instance_id,
                transport=DEFAULT_TRANSPORT,
                tier=instance.resolved_tier,
                model=model_id,
                canonical_alias=alias,
                usage_type="embedding" if embedding else "inference",
                capabilities=vllm_capabilities(embedding=embedding, extra=extra),
                context_window=_inherited_window(model_id, entries),
                policy_tags=tuple(instance.policy_tags),
                health=dict(health) if health is not None else {"status": "available"},
                metadata={"parent": parent} if isinstance(parent, str) else {},
            )
        )
    return offerings
