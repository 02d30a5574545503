"""Every setting of the fleet in one typed object, read from the environment first, then a YAML/TOML file.

Environment variables use the prefix ``VLLM_FLEET_`` and ``__`` for nesting
(``VLLM_FLEET_TIMEOUTS__CHAT_S=60``); complex values are JSON
(``VLLM_FLEET_INSTANCES='{"gpu1": {"base_url": "http://10.0.0.5:8000"}}'``).
``VLLM_FLEET_CONFIG`` names an optional ``.yaml``/``.yml``/``.toml`` file read after the environment.
"""

from __future__ import annotations

import ipaddress
import json
import os
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
    YamlConfigSettingsSource,
)

from provider.protocol.settings import SecuritySettings
from provider.sizing import process_share

__all__ = [
    "DEFAULT_LOCALHOST_URL",
    "DISCOVERY_INTERVAL_S",
    "FleetBlock",
    "InstanceSettings",
    "LaneSettings",
    "SecuritySettings",
    "Settings",
    "Timeouts",
    "get_settings",
    "normalize_base_url",
    "tier_for_url",
]

DISCOVERY_INTERVAL_S = 1800
DEFAULT_LOCALHOST_URL = "http://localhost:8000"
LOCALHOST_PROBE_TIMEOUT_S = 0.1
MODEL_DETAIL_CACHE_TTL_S = 24 * 3600
CIRCUIT_FAILURE_THRESHOLD = 3
CIRCUIT_HALF_OPEN_AFTER_S = 60.0

Tier = Literal["local", "direct", "private", "fleet", "cloud", "frontier"]
ReasoningSource = Literal["server", "tags", "preamble"]
FleetCapability = Literal["chat", "stream_chat", "embed"]

ALL_FLEET_CAPABILITIES: tuple[FleetCapability, ...] = ("chat", "stream_chat", "embed")
_LOOPBACK_HOSTS = {"localhost", "127.0.0.1", "::1", "[::1]"}


def normalize_base_url(url: str) -> str:
    """Strip whitespace, trailing slashes and a trailing ``/v1`` (vLLM's API root is the server root)."""
    cleaned = url.strip().rstrip("/")
    if cleaned.endswith("/v1"):
        cleaned = cleaned[: -len("/v1")].rstrip("/")
    return cleaned


def tier_for_url(url: str) -> Tier:
    """``local`` for loopback hosts, ``direct`` for anything else."""
    host = (urlsplit(url).hostname or "").lower()
    if host in _LOOPBACK_HOSTS:
        return "local"
    try:
        if ipaddress.ip_address(host).is_loopback:
            return "local"
    except ValueError:
        pass
    return "direct"


class FleetBlock(BaseModel):
    """How an instance takes part in the fleet (the seeds' ``fleet`` settings, serving by default)."""

    model_config = ConfigDict(extra="forbid")

    respond_to_requests: bool = True
    capabilities: list[FleetCapability] = Field(default_factory=lambda: list(ALL_FLEET_CAPABILITIES))
    consumer_priority: int = 0


class InstanceSettings(BaseModel):
    """One vLLM server."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: str = ""
    base_url: str = Field(
        default="",
        validation_alias=AliasChoices("base_url", "api_base", "endpoint", "vllm_api_base"),
    )
    api_key: SecretStr | None = None
    tier: Tier | None = None
    enabled: bool = True
    concurrency: int = Field(default=1, ge=1, le=4096)
    enable_thinking: bool | None = None
    reasoning_source: ReasoningSource = "server"
    allow_models: list[str] = Field(default_factory=list)
    deny_models: list[str] = Field(default_factory=list)
    model_capabilities: dict[str, list[str]] = Field(default_factory=dict)
    policy_tags: list[str] = Field(default_factory=list)
    fleet: FleetBlock = Field(default_factory=FleetBlock)

    @model_validator(mode="before")
    @classmethod
    def _flatten_seed_keys(cls, data: Any) -> Any:
        """Accept the seeds' nested forms: ``credentials.api_key`` and ``limits.concurrency``."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        credentials = data.pop("credentials", None)
        if isinstance(credentials, dict) and "api_key" in credentials and "api_key" not in data:
            data["api_key"] = credentials["api_key"]
        limits = data.pop("limits", None)
        if isinstance(limits, dict) and "concurrency" in limits and "concurrency" not in data:
            data["concurrency"] = limits["concurrency"]
        return data

    @field_validator("base_url")
    @classmethod
    def _normalize(cls, value: str) -> str:
        scheme, separator, _ = value.strip().partition("://")
        if value and (not separator or scheme.lower() not in ("http", "https")):
            raise ValueError(
                f"base_url {value.strip()!r} has no http:// or https:// scheme: write it as "
                f"'http://{value.strip().split('://')[-1]}'"
            )
        return normalize_base_url(value) if value else value

    @property
    def resolved_tier(self) -> Tier:
        """The explicit tier, else inferred from the URL."""
        return self.tier or tier_for_url(self.base_url)

    @property
    def usable(self) -> bool:
        """Enabled and has a URL (the seeds skip anything else)."""
        return self.enabled and bool(self.base_url)


class Timeouts(BaseModel):
    """Per-operation deadlines, in seconds, from submit."""

    model_config = ConfigDict(extra="forbid")

    chat_s: float = Field(default=30.0, gt=0)
    stream_s: float = Field(default=300.0, gt=0)
    embed_s: float = Field(default=10.0, gt=0)
    management_s: float = Field(default=10.0, gt=0)
    connect_s: float = Field(default=5.0, gt=0)

    @property
    def longest_s(self) -> float:
        """The longest deadline: broker visibility and consumer timeouts must stay above it."""
        return max(self.chat_s, self.stream_s, self.embed_s, self.management_s)


class LaneSettings(BaseModel):
    """Lane queue declarations (design.md defaults); frozen so declarations can be cached by value."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    style: Literal["shared", "offering"] = "shared"
    message_ttl_s: float = 120.0
    max_length: int = 100
    delivery_limit: int = 3
    expires_s: float | None = None
    consumer_priority: int = 0
    dead_letter_queue: str = "llm.fleet.dead"


class Settings(BaseSettings):
    """The whole fleet's configuration."""

    model_config = SettingsConfigDict(
        env_prefix="VLLM_FLEET_",
        env_nested_delimiter="__",
        extra="ignore",
    )

    broker_url: str = "redis://127.0.0.1:6379/0"
    result_backend: str = "redis://127.0.0.1:6379/1"
    redis_url: str = "redis://127.0.0.1:6379/2"
    key_prefix: str = "vllmfleet"
    instances: dict[str, InstanceSettings] = Field(default_factory=dict)
    probe_localhost: bool = True
    localhost_url: str = DEFAULT_LOCALHOST_URL
    localhost_probe_timeout_s: float = LOCALHOST_PROBE_TIMEOUT_S
    enable_thinking: bool = True
    allow_models: list[str] = Field(default_factory=list)
    deny_models: list[str] = Field(default_factory=list)
    model_aliases: dict[str, dict[str, str]] = Field(default_factory=dict)
    discovery_interval_s: float = DISCOVERY_INTERVAL_S
    # An instance with no offerings (never discovered, e.g. started while its vLLM slept) or unreachable at the
    # last discovery is tried again after this, doubling up to ``discovery_retry_max_s``.
    discovery_retry_s: float = Field(default=2.0, gt=0)
    discovery_retry_max_s: float = Field(default=30.0, gt=0)
    heartbeat_interval_s: float = 30.0
    registry_ttl_s: float = 90.0
    model_cache_ttl_s: float = MODEL_DETAIL_CACHE_TTL_S
    circuit_failure_threshold: int = CIRCUIT_FAILURE_THRESHOLD
    circuit_half_open_after_s: float = CIRCUIT_HALF_OPEN_AFTER_S
    # The half-open probe goes only to a request with this much time left (one about to expire would time out
    # and reopen the circuit whatever the instance's health).
    circuit_probe_min_time_left_s: float = Field(default=5.0, ge=0)
    retry_base_delay_s: float = 0.2
    retry_max_delay_s: float = 5.0
    timeouts: Timeouts = Field(default_factory=Timeouts)
    lanes: LaneSettings = Field(default_factory=LaneSettings)
    security: SecuritySettings = Field(default_factory=SecuritySettings)
    stream_max_len: int = 100_000
    stream_retention_s: float = 3600.0
    result_expires_s: float = 86400.0
    log_payloads: bool = False
    log_format: Literal["text", "json"] = "text"
    send_task_events: bool = False
    send_sent_events: bool = False
    metrics_port: int | None = None
    lease_s: float = Field(default=15.0, gt=0)
    # A worker's heartbeat lives this long without renewal (renewed every quarter of it): a redelivered request
    # whose lease holder has no heartbeat takes the lease over at once, instead of waiting out ``lease_s``.
    holder_ttl_s: float = Field(default=4.0, gt=0)
    # Redis broker: a message unacked this long is given to another worker. Workers keep touching the messages
    # they hold (every third of this), so only a dead worker's messages come back: short, so that recovery fits
    # inside the deadlines. None: DEFAULT_REDIS_VISIBILITY_TIMEOUT_S.
    redis_visibility_timeout_s: float | None = None
    # ``Settings.to_env`` writes None as "null": read it back as None (worker processes start from to_env).
    pause_when_waiting_over: int | None = Field(default=None, ge=0)
    pause_when_kv_cache_over: float | None = Field(default=None, ge=0, le=1)
    capacity_check_interval_s: float = Field(default=1.0, ge=0)
    capacity_resume_ratio: float = Field(default=0.8, gt=0, le=1)
    latency_window: int = Field(default=50, ge=1)
    latency_penalty_threshold_s: float | None = Field(default=None, gt=0)
    events_stream_max_len: int = Field(default=10_000, ge=1)
    # ``vllm-fleet worker --processes K`` starts K worker processes; process i (1..K) serves its share of every
    # instance's concurrency (the shares add up to the instance's), and metrics on ``metrics_port + i - 1``.
    # None: ``vllm-fleet worker`` sizes it from the cores and the instances' concurrency.
    worker_processes: int | None = Field(default=None, ge=1, le=64)
    worker_process_index: int = Field(default=0, ge=0, le=64)

    @model_validator(mode="after")
    def _take_process_share(self) -> Settings:
        """In process ``i`` of ``K``: 1/K of each instance's slots (the first ``c % K`` processes take one more)."""
        index, count = self.worker_process_index, self.worker_processes or 1
        if index == 0 or count == 1:
            return self
        if index > count:
            raise ValueError(f"worker_process_index {index} is beyond worker_processes {count}")
        for name, instance in self.instances.items():
            share = process_share(instance.concurrency, count, index)
            self.instances[name] = instance.model_copy(update={"concurrency": share})
        if self.metrics_port:
            self.metrics_port += index - 1
        return self

    def to_env(self) -> dict[str, str]:
        """These settings as ``VLLM_FLEET_*`` variables, secrets included: for starting fleet processes only."""
        env: dict[str, str] = {}
        for name, value in self.model_dump(mode="python", exclude_none=True).items():
            plain = _reveal(value)
            env[f"VLLM_FLEET_{name.upper()}"] = plain if isinstance(plain, str) else json.dumps(plain)
        return env

    @field_validator("instances", mode="before")
    @classmethod
    def _name_instances(cls, value: Any) -> Any:
        """Let each instance know its own name (the dict key)."""
        if isinstance(value, dict):
            named: dict[str, Any] = {}
            for name, body in value.items():
                if isinstance(body, dict):
                    body = {**body, "name": body.get("name") or name}
                elif isinstance(body, InstanceSettings) and not body.name:
                    body = body.model_copy(update={"name": name})
                named[name] = body
            return named
        return value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Init arguments, then the environment, then the optional config file."""
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        path = os.environ.get("VLLM_FLEET_CONFIG")
        if path:
            if path.endswith(".toml"):
                sources.append(TomlConfigSettingsSource(settings_cls, toml_file=path))
            else:
                sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=path))
        return tuple(sources)

    def usable_instances(self) -> list[InstanceSettings]:
        """Configured instances that are enabled and have a URL."""
        return [inst for inst in self.instances.values() if inst.usable]

    def thinking_default(self, instance: InstanceSettings) -> bool:
        """Instance setting first, then the global one."""
        return self.enable_thinking if instance.enable_thinking is None else instance.enable_thinking


def _reveal(value: Any) -> Any:
    """A JSON-ready copy with secret values revealed and paths as strings."""
    if isinstance(value, SecretStr):
        return value.get_secret_value()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dict):
        return {key: _reveal(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_reveal(item) for item in value]
    return value


_cached: Settings | None = None


def get_settings(*, reload: bool = False) -> Settings:
    """The process-wide settings, read once."""
    global _cached
    if _cached is None or reload:
        _cached = Settings()
    return _cached
