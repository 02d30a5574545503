"""Lane keys: the queue names that say what work is, not which worker does it.

    shared     llm.fleet.<embed|inference>.<model-slug>[.ctx<N>][.boundary.<slug>][.cap.<caps>][.elig.<fingerprint>]
    offering   llm.fleet.offering.<instance-slug>.<model-slug>.<embed|inference>

A shared lane is consumed by every worker that can serve the model with that context window; an offering lane
pins work to one instance. ``ctx<N>`` appears only on inference lanes and N is the exact context window.
The producer picks the smallest inference lane whose N covers the prompt plus the reply (:func:`choose_lane`).
``cap.<caps>`` qualifies a lane by capabilities only some instances of a model have (``tools``, ``vision``;
several joined by ``-`` in sorted order): a request that needs them goes to that lane, which only workers
whose instance has every one of them consume, so it never reaches an instance that would refuse it.

    LaneError (ValueError)
    └── NoLaneError            no live lane of the model has room for the request
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal, Protocol, cast, runtime_checkable

import rfc8785

from provider.fleet.events import is_sensitive_key, normalize_key, unsafe_value_reason

__all__ = [
    "BYTES_PER_TOKEN_ESTIMATE",
    "FINGERPRINT_HEX_CHARS",
    "LANE_PREFIX",
    "MAX_LANE_KEY_CHARS",
    "MAX_PUBLIC_SEGMENT_CHARS",
    "MESSAGE_OVERHEAD_TOKENS",
    "REPLY_PRIMING_TOKENS",
    "LaneError",
    "LaneKey",
    "LaneKind",
    "LaneStyle",
    "NoLaneError",
    "UsageType",
    "capability_segment",
    "choose_lane",
    "eligibility_fingerprint",
    "estimate_tokens",
    "lane_kind",
    "looks_sensitive",
    "needed_context",
    "normalize_usage_type",
    "offering_lane_key",
    "parse_lane",
    "public_segment",
    "shared_lane_key",
    "slug",
]

LANE_PREFIX: Final = "llm.fleet"
OFFERING_SEGMENT: Final = "offering"
BOUNDARY_SEGMENT: Final = "boundary"
FINGERPRINT_SEGMENT: Final = "elig"
CAPABILITY_SEGMENT: Final = "cap"
CONTEXT_PREFIX: Final = "ctx"
MAX_PUBLIC_SEGMENT_CHARS: Final = 64
MAX_LANE_KEY_CHARS: Final = 255  # AMQP queue names and routing keys are short strings
FINGERPRINT_HEX_CHARS: Final = 16

# Token estimate: byte-level BPE vocabularies average about four bytes a token on English prose, fewer on
# code, digits and non-Latin scripts (a CJK character is three UTF-8 bytes and about one token). Three bytes
# a token overestimates nearly everything; an overestimate only picks a larger lane, an underestimate gets
# a 400 from vLLM.
BYTES_PER_TOKEN_ESTIMATE: Final = 3
MESSAGE_OVERHEAD_TOKENS: Final = 8  # role markers and separators a chat template wraps around each message
REPLY_PRIMING_TOKENS: Final = 8  # the assistant header the template opens for the reply
MIN_REPLY_TOKENS: Final = 1  # a request without max_tokens still needs room for one token

UsageType = Literal["inference", "embedding"]
LaneKind = Literal["embed", "inference"]
LaneStyle = Literal["shared", "offering"]

_USAGE_NAMES: Final[Mapping[str, UsageType]] = {
    "embedding": "embedding",
    "embeddings": "embedding",
    "embed": "embedding",
    "inference": "inference",
    "chat": "inference",
    "completion": "inference",
    "completions": "inference",
    "text": "inference",
    "generation": "inference",
}
_KIND_FOR_USAGE: Final[Mapping[UsageType, LaneKind]] = {"embedding": "embed", "inference": "inference"}
_USAGE_FOR_KIND: Final[Mapping[LaneKind, UsageType]] = {"embed": "embedding", "inference": "inference"}

_SENSITIVE_WORDS: Final = frozenset(
    {
        "key",
        "keys",
        "apikey",
        "accesskey",
        "privatekey",
        "token",
        "tokens",
        "secret",
        "secrets",
        "password",
        "passwords",
        "passwd",
        "bearer",
        "cookie",
        "cookies",
        "session",
        "sessions",
        "jwt",
        "signature",
        "signatures",
        "credential",
        "credentials",
    }
)
_SENSITIVE_PREFIXES: Final = ("auth",)  # auth, authz, authn, authorization, authentication

# Keys that name who or where (an instance, a host, a user): a fingerprint carrying one would split a shared
# lane per worker, which is what offering lanes are for.
_IDENTITY_KEYS: Final = frozenset(
    {
        "caller",
        "host",
        "host_id",
        "hostname",
        "identity",
        "instance",
        "instance_id",
        "node",
        "node_id",
        "offering_id",
        "owner",
        "provider_instance",
        "user",
        "user_id",
        "worker",
        "worker_id",
    }
)

# Beyond the registry's sensitive keys: anything that names an address, a location on disk or a prompt.
_ADDRESS_KEY_SUFFIXES: Final = ("_path", "_url", "_uri", "_endpoint", "_dir", "_file", "_prompt")
_ADDRESS_KEYS: Final = frozenset({"address", "dir", "file", "ip", "ip_address", "uri"})
_EXCLUDED_COMPACT_KEYS: Final = frozenset(key.replace("_", "") for key in _IDENTITY_KEYS | _ADDRESS_KEYS)

_NON_SLUG_RUN = re.compile(r"[^a-z0-9]+")
_SLUG_PATTERN = re.compile(r"[a-z0-9]+(?:-[a-z0-9]+)*")
_CONTEXT_PATTERN = re.compile(r"ctx([1-9][0-9]*)")


class LaneError(ValueError):
    """A lane key that cannot be built or parsed."""


class NoLaneError(LaneError):
    """No live inference lane of the model has a context window large enough for the request."""

    def __init__(self, model: str | None, needed_context: int, available: Sequence[int] = ()) -> None:
        self.model = model
        self.needed_context = needed_context
        self.available = tuple(sorted(available))
        subject = f"model {model!r}" if model else "the model"
        if self.available:
            detail = f"the largest is ctx{self.available[-1]}"
        else:
            detail = "there is no live inference lane for it"
        super().__init__(f"no inference lane for {subject} fits {needed_context} tokens of context: {detail}")


def slug(text: str) -> str:
    """Lower-case, each run outside ``[a-z0-9]`` as one ``-``, no ``-`` at either end."""
    return _NON_SLUG_RUN.sub("-", text.lower()).strip("-")


def looks_sensitive(text: str) -> bool:
    """Whether any word of a text's slug names a credential (key, token, secret, auth..., bearer, ...)."""
    return any(
        word in _SENSITIVE_WORDS or word.startswith(_SENSITIVE_PREFIXES) for word in slug(text).split("-") if word
    )


def public_segment(value: str, name: str) -> str:
    """A boundary or fingerprint segment: slugged, not empty, at most 64 characters, not credential-like."""
    segment = slug(value)
    if not segment:
        raise LaneError(f"{name} is empty after slugging")
    if len(segment) > MAX_PUBLIC_SEGMENT_CHARS:
        raise LaneError(f"{name} exceeds {MAX_PUBLIC_SEGMENT_CHARS} characters after slugging")
    if looks_sensitive(segment):
        raise LaneError(f"{name} looks sensitive and may not appear in a lane key")
    return segment


def _required_slug(value: str, name: str) -> str:
    """A model or instance segment: slugged and not empty."""
    if not isinstance(value, str):
        raise LaneError(f"{name} must be a string")
    segment = slug(value)
    if not segment:
        raise LaneError(f"{name} {value!r} is empty after slugging")
    return segment


def normalize_usage_type(usage_type: str) -> UsageType:
    """``embedding`` for embed/embeddings/embedding, ``inference`` for chat/completion/text/inference."""
    usage = _USAGE_NAMES.get(str(usage_type).strip().lower())
    if usage is None:
        raise LaneError(f"unknown usage type {usage_type!r}; expected inference or embedding")
    return usage


def lane_kind(usage_type: str) -> LaneKind:
    """``embed`` for embedding usage, else ``inference``."""
    return _KIND_FOR_USAGE[normalize_usage_type(usage_type)]


def _check_length(key: str) -> str:
    """A whole key no longer than a broker accepts."""
    if len(key) > MAX_LANE_KEY_CHARS:
        raise LaneError(f"lane key exceeds {MAX_LANE_KEY_CHARS} characters")
    return key


def _positive_int(value: object, name: str) -> int:
    """An integer of at least 1 (booleans refused)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise LaneError(f"{name} must be a positive integer")
    return value


@dataclass(frozen=True)
class LaneKey:
    """A lane key in parts; ``key`` rebuilds the string, ``parse_lane`` reads one back."""

    style: LaneStyle
    kind: LaneKind
    model_slug: str
    context_window: int | None = None
    boundary: str | None = None
    fingerprint: str | None = None
    instance_slug: str | None = None
    capabilities: str | None = None

    @property
    def usage_type(self) -> UsageType:
        """The usage the lane serves: ``embedding`` or ``inference``."""
        return _USAGE_FOR_KIND[self.kind]

    @property
    def key(self) -> str:
        """The lane key string."""
        if self.style == "offering":
            return _check_length(f"{LANE_PREFIX}.{OFFERING_SEGMENT}.{self.instance_slug}.{self.model_slug}.{self.kind}")
        parts = [LANE_PREFIX, self.kind, self.model_slug]
        if self.context_window is not None:
            parts.append(f"{CONTEXT_PREFIX}{self.context_window}")
        if self.boundary is not None:
            parts += [BOUNDARY_SEGMENT, self.boundary]
        if self.capabilities is not None:
            parts += [CAPABILITY_SEGMENT, self.capabilities]
        if self.fingerprint is not None:
            parts += [FINGERPRINT_SEGMENT, self.fingerprint]
        return _check_length(".".join(parts))

    def __str__(self) -> str:
        return self.key


def shared_lane_key(
    model: str,
    usage_type: str = "inference",
    *,
    context_window: int | None = None,
    max_input_tokens: int | None = None,
    boundary: str | None = None,
    fingerprint: str | None = None,
    capabilities: Iterable[str] = (),
) -> str:
    """``llm.fleet.<kind>.<model-slug>[.ctx<N>][.boundary.<slug>][.cap.<caps>][.elig.<fingerprint>]``.

    ``model`` is the canonical alias when there is one; N is the context window, else ``max_input_tokens``,
    and appears only on inference lanes. ``capabilities`` qualify the lane (see :func:`capability_segment`).
    """
    kind = lane_kind(usage_type)
    window = context_window if context_window is not None else max_input_tokens
    return LaneKey(
        style="shared",
        kind=kind,
        model_slug=_required_slug(model, "model"),
        context_window=_positive_int(window, "context window") if kind == "inference" and window is not None else None,
        boundary=None if boundary is None else public_segment(boundary, "boundary"),
        fingerprint=None if fingerprint is None else public_segment(fingerprint, "eligibility fingerprint"),
        capabilities=capability_segment(capabilities),
    ).key


def capability_segment(capabilities: Iterable[str]) -> str | None:
    """The ``cap`` segment of a set of capabilities: their slugs sorted and joined by ``-`` (None when empty)."""
    names = sorted({_required_slug(name, "capability") for name in capabilities})
    return "-".join(names) if names else None


def offering_lane_key(instance: str, model: str, usage_type: str = "inference") -> str:
    """``llm.fleet.offering.<instance-slug>.<model-slug>.<embed|inference>``: work pinned to one instance.

    The instance name is an operator's label, so it is slugged but not judged for sensitive words.
    """
    return LaneKey(
        style="offering",
        kind=lane_kind(usage_type),
        model_slug=_required_slug(model, "model"),
        instance_slug=_required_slug(instance, "instance"),
    ).key


def parse_lane(key: str) -> LaneKey:
    """A lane key's parts; anything that is not a shared or offering lane key is refused."""
    if not isinstance(key, str) or len(key) > MAX_LANE_KEY_CHARS:
        raise LaneError("not a lane key")
    parts = key.split(".")
    if parts[:2] != LANE_PREFIX.split(".") or len(parts) < 4:
        raise LaneError(f"not a fleet lane key: {key!r}")
    if not all(_SLUG_PATTERN.fullmatch(part) for part in parts[3:]):
        raise LaneError(f"lane key segments must be slugs: {key!r}")
    if parts[2] == OFFERING_SEGMENT:
        if len(parts) != 6 or parts[5] not in _USAGE_FOR_KIND:
            raise LaneError(f"an offering lane is llm.fleet.offering.<instance>.<model>.<embed|inference>: {key!r}")
        return LaneKey(style="offering", kind=cast(LaneKind, parts[5]), model_slug=parts[4], instance_slug=parts[3])
    if parts[2] not in _USAGE_FOR_KIND:
        raise LaneError(f"unknown lane kind {parts[2]!r} in {key!r}")
    kind = cast(LaneKind, parts[2])
    rest = parts[4:]
    context_window: int | None = None
    if rest and (match := _CONTEXT_PATTERN.fullmatch(rest[0])):
        if kind != "inference":
            raise LaneError(f"only inference lanes carry a context window: {key!r}")
        context_window = int(match.group(1))
        rest = rest[1:]
    segments: dict[str, str] = {}
    for name in (BOUNDARY_SEGMENT, CAPABILITY_SEGMENT, FINGERPRINT_SEGMENT):
        if len(rest) >= 2 and rest[0] == name:
            segments[name] = rest[1]
            rest = rest[2:]
    if rest:
        raise LaneError(f"unexpected segments {'.'.join(rest)!r} in lane key {key!r}")
    for name, value in segments.items():
        if len(value) > MAX_PUBLIC_SEGMENT_CHARS or looks_sensitive(value):
            raise LaneError(f"{name} segment of {key!r} is not a valid public segment")
    return LaneKey(
        style="shared",
        kind=kind,
        model_slug=parts[3],
        context_window=context_window,
        boundary=segments.get(BOUNDARY_SEGMENT),
        fingerprint=segments.get(FINGERPRINT_SEGMENT),
        capabilities=segments.get(CAPABILITY_SEGMENT),
    )


def _sorted_array(items: Iterable[Any]) -> list[Any]:
    """An array in canonical order: its items sorted by their RFC 8785 encoding."""
    return sorted(items, key=rfc8785.dumps)


def _excluded_from_fingerprint(key: str) -> bool:
    """Whether a key names a credential, an address, a path, a prompt or an identity."""
    normalized = normalize_key(key)
    compact = normalized.replace("_", "")  # host_name, hostName and hostname alike
    return (
        is_sensitive_key(key)
        or looks_sensitive(key)
        or compact in _EXCLUDED_COMPACT_KEYS
        or normalized.endswith(_ADDRESS_KEY_SUFFIXES)
    )


def _canonical_sorted(value: Any, path: str) -> Any:
    """A copy of operator eligibility data with arrays sorted (by canonical encoding).

    Keys naming credentials, addresses, paths, prompts or identities are refused, and so are values that look
    like URLs, bearer credentials or JWTs: none of them may decide (or leak through) a lane name.
    """
    if isinstance(value, Mapping):
        result: dict[str, Any] = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise LaneError(f"{path} has a key that is not a string")
            child = f"{path}.{key}"
            if _excluded_from_fingerprint(key):
                raise LaneError(f"{child} may not enter an eligibility fingerprint")
            result[key] = _canonical_sorted(item, child)
        return result
    if isinstance(value, list | tuple | set | frozenset):
        return _sorted_array(_canonical_sorted(item, f"{path}.{index}") for index, item in enumerate(value))
    if isinstance(value, str) and unsafe_value_reason(value) is not None:
        raise LaneError(f"{path} looks like {unsafe_value_reason(value)} and may not enter a fingerprint")
    if value is None or isinstance(value, str | bool | int | float):
        return value
    raise LaneError(f"{path} holds a {type(value).__name__}, which canonical JSON cannot carry")


def eligibility_fingerprint(
    *,
    usage_type: str,
    capabilities: Iterable[str] = (),
    context_window: int | None = None,
    max_output_tokens: int | None = None,
    policy_tags: Iterable[str] = (),
    eligibility: Mapping[str, Any] | None = None,
) -> str:
    """First 16 hex characters of SHA-256 over canonical JSON of what makes workers interchangeable.

    The JSON is RFC 8785 with every array sorted; credentials, addresses, paths, prompts and identities are
    refused rather than hashed.

    Pass capabilities already normalized (``provider.fleet.offerings.normalize_capabilities``) so every side agrees.
    """
    document = {
        "usage_type": normalize_usage_type(usage_type),
        "capabilities": _sorted_array(set(capabilities)),
        "context_window": context_window,
        "max_output_tokens": max_output_tokens,
        "policy_tags": _sorted_array(set(policy_tags)),
        "eligibility": _canonical_sorted(dict(eligibility or {}), "eligibility"),
    }
    return hashlib.sha256(rfc8785.dumps(document)).hexdigest()[:FINGERPRINT_HEX_CHARS]


@runtime_checkable
class _HasSharedLane(Protocol):
    """Anything that knows its shared lane key (an Offering)."""

    @property
    def shared_lane(self) -> str: ...


def _as_lane_key(candidate: str | LaneKey | _HasSharedLane) -> LaneKey:
    """A candidate as parsed lane parts."""
    if isinstance(candidate, LaneKey):
        return candidate
    if isinstance(candidate, str):
        return parse_lane(candidate)
    if isinstance(candidate, _HasSharedLane):
        return parse_lane(candidate.shared_lane)
    raise LaneError(f"cannot read a lane from a {type(candidate).__name__}")


def choose_lane(
    candidates: Iterable[str | LaneKey | _HasSharedLane],
    needed_context: int,
    *,
    model: str | None = None,
    boundary: str | None = None,
    fingerprint: str | None = None,
    capabilities: Iterable[str] = (),
) -> str:
    """The inference lane of one model with the smallest ``ctx<N>`` that is at least ``needed_context``.

    Pass only lanes with live workers. ``model`` (its canonical alias) selects among several models;
    without it the candidates' inference lanes must all be of one model. Lanes match ``boundary`` and
    ``fingerprint`` exactly (None: only lanes without that segment), and ``capabilities`` exactly (none: only
    lanes without a ``cap`` segment). Embedding, offering and window-less lanes are ignored.
    """
    needed = _positive_int(needed_context, "needed context")
    model_slug = None if model is None else _required_slug(model, "model")
    boundary_slug = None if boundary is None else slug(boundary)
    fingerprint_slug = None if fingerprint is None else slug(fingerprint)
    capability_slug = capability_segment(capabilities)
    lanes = [
        lane
        for lane in map(_as_lane_key, candidates)
        if lane.style == "shared"
        and lane.kind == "inference"
        and lane.context_window is not None
        and (model_slug is None or lane.model_slug == model_slug)
        and lane.boundary == boundary_slug
        and lane.fingerprint == fingerprint_slug
        and lane.capabilities == capability_slug
    ]
    models = {lane.model_slug for lane in lanes}
    if len(models) > 1:
        raise LaneError(f"candidate lanes span several models ({', '.join(sorted(models))}); name the model")
    fitting = sorted(
        (lane for lane in lanes if lane.context_window is not None and lane.context_window >= needed),
        key=lambda lane: (lane.context_window, lane.key),
    )
    if not fitting:
        shown = model if model is not None else (next(iter(models)) if models else None)
        raise NoLaneError(shown, needed, [lane.context_window for lane in lanes if lane.context_window is not None])
    return fitting[0].key


def needed_context(prompt_tokens: int, max_tokens: int | None = None) -> int:
    """Tokens a request needs in the window: the prompt plus the reply (at least one token when unbounded)."""
    for name, value in (("prompt_tokens", prompt_tokens), ("max_tokens", max_tokens)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise LaneError(f"{name} must be a non-negative integer")
    return prompt_tokens + (max_tokens if max_tokens is not None else MIN_REPLY_TOKENS)


def _text_tokens(text: str) -> int:
    """A generous token count for a text: its UTF-8 bytes over three, rounded up."""
    return math.ceil(len(text.encode("utf-8")) / BYTES_PER_TOKEN_ESTIMATE)


def _content_text(content: Any) -> str:
    """The text of a message content: a string, or the text parts of a list of parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence):
        return "".join(
            str(part.get("text") or "") if isinstance(part, Mapping) else str(part)
            for part in content
            if not isinstance(part, Mapping) or part.get("type", "text") == "text"
        )
    return ""


def _compact_json(value: Any) -> str:
    """Compact JSON for counting, tolerant of values JSON cannot carry."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, default=str)


def estimate_tokens(
    messages: str | Sequence[Mapping[str, Any]],
    *,
    tools: Sequence[Mapping[str, Any]] | None = None,
) -> int:
    """A conservative prompt size when no tokenizer is at hand (see :data:`BYTES_PER_TOKEN_ESTIMATE`).

    Each message counts its text, name and tool calls, plus :data:`MESSAGE_OVERHEAD_TOKENS`; the reply
    header and any tool schemas are added. Image and audio parts are not counted: count those with the
    server's /tokenize.
    """
    if isinstance(messages, str):
        return _text_tokens(messages) + REPLY_PRIMING_TOKENS
    total = REPLY_PRIMING_TOKENS
    for message in messages:
        total += MESSAGE_OVERHEAD_TOKENS + _text_tokens(_content_text(message.get("content")))
        for extra in ("name", "tool_call_id"):
            if isinstance(message.get(extra), str):
                total += _text_tokens(message[extra])
        if message.get("tool_calls"):
            total += _text_tokens(_compact_json(message["tool_calls"]))
    if tools:
        total += _text_tokens(_compact_json(list(tools)))
    return total
