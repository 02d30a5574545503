"""Registry events: what a worker tells the fleet about its offerings, with nothing secret in them.

An event is ``{event_id, event_type, occurred_at, offering, runtime, capacity, health, lane, metadata}``
(nil values dropped) and travels on the ``llm.registry`` topic exchange under ``llm.registry.<event_type>``.

The sanitizer works in two layers:

1. Keys. A key is normalized (camelCase split, lower-case, ``-`` and spaces to ``_``) and is sensitive
   when it is one of :data:`SENSITIVE_KEYS` or ends in one of :data:`SENSITIVE_KEY_SUFFIXES`. In the
   ``offering`` section such keys are dropped at any depth (an offering may carry provider metadata we do
   not control); anywhere else they make the event invalid, and :class:`UnsafeEventError` names the
   dotted path.
2. Values, as defence in depth. A string that looks like a URL (``scheme://``), a bearer credential or a
   JWT is refused in every section, under any key name, because key names alone miss
   ``{"error": "GET http://..."}`` or ``{"note": "Bearer abc"}``. Use :func:`scrub_text` on free text
   (error messages) before it enters an event.

    RegistryEventError (ValueError)
    ├── UnknownEventTypeError       an event type outside EVENT_TYPES
    └── UnsafeEventError            a sensitive key or value outside the offering (``.path`` names it)
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final, Literal, cast, get_args

from provider.fleet.names import REGISTRY_EXCHANGE, REGISTRY_ROUTING_PREFIX

if TYPE_CHECKING:
    from provider.fleet.offerings import Offering

__all__ = [
    "EVENT_TYPES",
    "REGISTRY_EXCHANGE",
    "REGISTRY_ROUTING_PREFIX",
    "SENSITIVE_KEYS",
    "SENSITIVE_KEY_SUFFIXES",
    "EventType",
    "RegistryEvent",
    "RegistryEventError",
    "UnknownEventTypeError",
    "UnsafeEventError",
    "format_timestamp",
    "is_sensitive_key",
    "normalize_key",
    "scrub_text",
    "unsafe_value_reason",
]


EventType = Literal["offering_available", "offering_unavailable", "offering_degraded", "offering_heartbeat"]
EVENT_TYPES: Final[tuple[str, ...]] = get_args(EventType)

SENSITIVE_KEYS: Final = frozenset(
    {
        "access_key",
        "api_key",
        "authorization",
        "bearer",
        "client_secret",
        "credential",
        "credentials",
        "endpoint",
        "endpoint_url",
        "password",
        "path",
        "private_key",
        "prompt",
        "reply_to",
        "secret",
        "secrets",
        "token",
        "url",
    }
)
SENSITIVE_KEY_SUFFIXES: Final = ("_key", "_secret", "_token", "_password")

# The sections besides ``offering``; a sensitive key in any of them makes the event invalid.
_STRICT_SECTIONS: Final = ("runtime", "capacity", "health", "metadata")
_FIELDS: Final = (
    "event_id",
    "event_type",
    "occurred_at",
    "offering",
    "runtime",
    "capacity",
    "health",
    "lane",
    "metadata",
)
_REDACTED: Final = "[redacted]"
_Section = dict[str, Any] | None

_CAMEL_BOUNDARY = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")
_KEY_SEPARATORS = re.compile(r"[-\s]+")
_URL_PATTERN = re.compile(r"\b[a-z][a-z0-9+.\-]*://\S*", re.IGNORECASE)
_BEARER_PATTERN = re.compile(r"\bbearer\s+\S+", re.IGNORECASE)
_JWT_PATTERN = re.compile(r"\beyJ[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")
_VALUE_PATTERNS: Final = (
    ("a URL", _URL_PATTERN),
    ("a bearer credential", _BEARER_PATTERN),
    ("a JWT", _JWT_PATTERN),
)


class RegistryEventError(ValueError):
    """Root of every error a registry event raises."""


class UnknownEventTypeError(RegistryEventError):
    """An event type that is not one of the four the registry knows."""

    def __init__(self, event_type: object) -> None:
        super().__init__(f"unknown registry event type {event_type!r}; expected one of {', '.join(EVENT_TYPES)}")
        self.event_type = event_type


class UnsafeEventError(RegistryEventError):
    """A sensitive key or value where it may not be; ``path`` is its dotted location, never its value."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"registry event refused: {path} {reason}")
        self.path = path
        self.reason = reason


def normalize_key(key: str) -> str:
    """The form keys are judged in: camelCase split, lower-case, ``-`` and spaces as ``_``."""
    return _KEY_SEPARATORS.sub("_", _CAMEL_BOUNDARY.sub("_", key.strip())).lower()


def is_sensitive_key(key: str) -> bool:
    """Whether a key names a credential, an address, a path or a prompt."""
    normalized = normalize_key(key)
    return normalized in SENSITIVE_KEYS or normalized.endswith(SENSITIVE_KEY_SUFFIXES)


def unsafe_value_reason(value: str) -> str | None:
    """What a string looks like if it looks like a URL, a bearer credential or a JWT; else None."""
    for reason, pattern in _VALUE_PATTERNS:
        if pattern.search(value):
            return reason
    return None


def scrub_text(text: str) -> str:
    """Free text with URLs, bearer credentials and JWTs replaced, so an error message can enter an event."""
    for _, pattern in _VALUE_PATTERNS:
        text = pattern.sub(_REDACTED, text)
    return text


def format_timestamp(moment: datetime) -> str:
    """UTC with microseconds and a ``Z``: ``2026-05-09T07:35:25.123456Z``."""
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise RegistryEventError("occurred_at must be timezone-aware")
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _parse_timestamp(value: str | datetime) -> datetime:
    """A timezone-aware UTC datetime from an ISO 8601 string or a datetime."""
    if isinstance(value, datetime):
        moment = value
    elif isinstance(value, str):
        try:
            moment = datetime.fromisoformat(value)
        except ValueError as exc:
            raise RegistryEventError("occurred_at is not an ISO 8601 timestamp") from exc
    else:
        raise RegistryEventError("occurred_at must be an ISO 8601 string or a datetime")
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise RegistryEventError("occurred_at must be timezone-aware")
    return moment.astimezone(UTC)


def _clean(value: Any, path: str, *, drop_sensitive: bool) -> Any:
    """A JSON-ready copy of ``value``: sensitive keys dropped or refused, unsafe strings refused."""
    if isinstance(value, Mapping):
        cleaned: dict[str, Any] = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise RegistryEventError(f"{path} has a key that is not a string")
            child = f"{path}.{key}"
            if is_sensitive_key(key):
                if drop_sensitive:
                    continue
                raise UnsafeEventError(child, "is a sensitive key")
            cleaned[key] = _clean(item, child, drop_sensitive=drop_sensitive)
        return cleaned
    if isinstance(value, list | tuple):
        return [_clean(item, f"{path}.{index}", drop_sensitive=drop_sensitive) for index, item in enumerate(value)]
    if isinstance(value, set | frozenset):
        return _clean(sorted(value, key=repr), path, drop_sensitive=drop_sensitive)
    if isinstance(value, str):
        reason = unsafe_value_reason(value)
        if reason is not None:
            raise UnsafeEventError(path, f"looks like {reason}")
        return value
    if value is None or isinstance(value, bool | int | float):
        return value
    raise RegistryEventError(f"{path} holds a {type(value).__name__}, which JSON cannot carry")


def _section(value: Mapping[str, Any] | None, name: str) -> dict[str, Any] | None:
    """One event section, cleaned; the offering loses its sensitive keys, the others are refused for them."""
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise RegistryEventError(f"{name} must be a mapping")
    return cast(dict[str, Any], _clean(value, name, drop_sensitive=name == "offering"))


def _offering_dict(offering: Offering | Mapping[str, Any]) -> dict[str, Any]:
    """An offering as a plain mapping (an :class:`~provider.fleet.offerings.Offering` is dumped in JSON mode)."""
    if isinstance(offering, Mapping):
        return dict(offering)
    dump = getattr(offering, "model_dump", None)
    if not callable(dump):
        raise RegistryEventError("offering must be an Offering or a mapping")
    return cast(dict[str, Any], dump(mode="json"))


@dataclass(frozen=True)
class RegistryEvent:
    """One registry event, sanitized when built; use :meth:`build` or the per-type shortcuts."""

    event_type: EventType
    offering: dict[str, Any]
    event_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    occurred_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    runtime: dict[str, Any] | None = None
    capacity: dict[str, Any] | None = None
    health: dict[str, Any] | None = None
    lane: str | None = None
    metadata: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        """Refuse unknown types and unsafe content; drop sensitive offering keys."""
        if self.event_type not in EVENT_TYPES:
            raise UnknownEventTypeError(self.event_type)
        if not isinstance(self.event_id, str) or not self.event_id.strip():
            raise RegistryEventError("event_id must be a non-empty string")
        object.__setattr__(self, "occurred_at", _parse_timestamp(self.occurred_at))
        offering = _section(self.offering, "offering")
        if not offering:
            raise RegistryEventError("an event needs a non-empty offering")
        object.__setattr__(self, "offering", offering)
        for name in _STRICT_SECTIONS:
            object.__setattr__(self, name, _section(getattr(self, name), name))
        if self.lane is not None:
            if not isinstance(self.lane, str):
                raise RegistryEventError("lane must be a string")
            reason = unsafe_value_reason(self.lane)
            if reason is not None:
                raise UnsafeEventError("lane", f"looks like {reason}")

    @classmethod
    def build(
        cls,
        event_type: str,
        offering: Offering | Mapping[str, Any],
        *,
        runtime: Mapping[str, Any] | None = None,
        capacity: Mapping[str, Any] | None = None,
        health: Mapping[str, Any] | None = None,
        lane: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        event_id: str | None = None,
        occurred_at: datetime | None = None,
    ) -> RegistryEvent:
        """An event of any known type about one offering (an Offering or its dumped mapping)."""
        if event_type not in EVENT_TYPES:
            raise UnknownEventTypeError(event_type)
        return cls(
            event_type=cast(EventType, event_type),
            offering=_offering_dict(offering),
            event_id=event_id or str(uuid.uuid4()),
            occurred_at=occurred_at or datetime.now(UTC),
            # __post_init__ copies every section into plain dicts (and checks it is a mapping)
            runtime=cast(_Section, runtime),
            capacity=cast(_Section, capacity),
            health=cast(_Section, health),
            lane=lane,
            metadata=cast(_Section, metadata),
        )

    @classmethod
    def available(cls, offering: Offering | Mapping[str, Any], **sections: Any) -> RegistryEvent:
        """An ``offering_available`` event."""
        return cls.build("offering_available", offering, **sections)

    @classmethod
    def unavailable(cls, offering: Offering | Mapping[str, Any], **sections: Any) -> RegistryEvent:
        """An ``offering_unavailable`` event."""
        return cls.build("offering_unavailable", offering, **sections)

    @classmethod
    def degraded(cls, offering: Offering | Mapping[str, Any], **sections: Any) -> RegistryEvent:
        """An ``offering_degraded`` event."""
        return cls.build("offering_degraded", offering, **sections)

    @classmethod
    def heartbeat(cls, offering: Offering | Mapping[str, Any], **sections: Any) -> RegistryEvent:
        """An ``offering_heartbeat`` event."""
        return cls.build("offering_heartbeat", offering, **sections)

    @property
    def routing_key(self) -> str:
        """The topic routing key it is published under: ``llm.registry.<event_type>``."""
        return f"{REGISTRY_ROUTING_PREFIX}.{self.event_type}"

    def to_dict(self) -> dict[str, Any]:
        """The wire form: every field in protocol order, nil values dropped, the time as UTC ``...Z``."""
        body: dict[str, Any] = {
            "event_id": self.event_id,
            "event_type": self.event_type,
            "occurred_at": format_timestamp(self.occurred_at),
            "offering": self.offering,
            "runtime": self.runtime,
            "capacity": self.capacity,
            "health": self.health,
            "lane": self.lane,
            "metadata": self.metadata,
        }
        return {key: value for key, value in body.items() if value is not None}

    def to_json(self) -> str:
        """The wire form as compact JSON."""
        return json.dumps(self.to_dict(), separators=(",", ":"), ensure_ascii=False)

    @classmethod
    def from_dict(cls, body: Mapping[str, Any]) -> RegistryEvent:
        """An event read from the wire, checked exactly as one built here (unknown fields refused)."""
        if not isinstance(body, Mapping):
            raise RegistryEventError("a registry event must be a JSON object")
        unknown = sorted(set(body) - set(_FIELDS))
        if unknown:
            raise RegistryEventError(f"unknown registry event fields: {', '.join(map(str, unknown))}")
        for required in ("event_id", "event_type", "occurred_at", "offering"):
            if body.get(required) is None:
                raise RegistryEventError(f"registry event lacks {required}")
        if body["event_type"] not in EVENT_TYPES:
            raise UnknownEventTypeError(body["event_type"])
        return cls(
            event_type=body["event_type"],
            offering=body["offering"],
            event_id=body["event_id"],
            occurred_at=_parse_timestamp(body["occurred_at"]),
            runtime=body.get("runtime"),
            capacity=body.get("capacity"),
            health=body.get("health"),
            lane=body.get("lane"),
            metadata=body.get("metadata"),
        )

    @classmethod
    def from_json(cls, text: str | bytes) -> RegistryEvent:
        """An event from its JSON wire form."""
        try:
            body = json.loads(text)
        except ValueError as exc:
            raise RegistryEventError("a registry event is not valid JSON") from exc
        return cls.from_dict(body)
