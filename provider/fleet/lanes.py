"""Lane keys: the queue names that say what work is, not which worker does it.

    shared     llm.fleet.<embed|inference>.<model-slug>[.ctx<N>][.cap.<caps>]
    offering   llm.fleet.offering.<instance-slug>.<model-slug>.<embed|inference>

A shared lane is consumed by every worker that can serve the model with that context window; an offering lane
pins work to one instance. ``ctx<N>`` appears only on inference lanes and N is the exact context window.
The producer picks the smallest inference lane whose N covers the prompt plus the reply (:func:`choose_lane`).
``cap.<caps>`` qualifies a lane by capabilities only some instances of a model have (``tools``, ``vision``;
several joined by ``-`` in sorted order): a request that needs them goes to that lane, which only workers
whose instance has every one of them consume, so it never reaches an instance that would refuse it.
How much context a request needs is estimated in ``provider.fleet.token_estimate``.

    LaneError (ValueError)
    └── NoLaneError            no live lane of the model has room for the request
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final, Literal, Protocol, cast, runtime_checkable

from provider.fleet.names import LANE_PREFIX

__all__ = [
    "LANE_PREFIX",
    "MAX_LANE_KEY_CHARS",
    "LaneError",
    "LaneKey",
    "LaneKind",
    "LaneStyle",
    "NoLaneError",
    "UsageType",
    "capability_segment",
    "choose_lane",
    "lane_kind",
    "normalize_usage_type",
    "offering_lane_key",
    "parse_lane",
    "shared_lane_key",
    "slug",
]

OFFERING_SEGMENT: Final = "offering"
CAPABILITY_SEGMENT: Final = "cap"
CONTEXT_PREFIX: Final = "ctx"
MAX_LANE_KEY_CHARS: Final = 255  # AMQP queue names and routing keys are short strings

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
        if self.capabilities is not None:
            parts += [CAPABILITY_SEGMENT, self.capabilities]
        return _check_length(".".join(parts))

    def __str__(self) -> str:
        return self.key


def shared_lane_key(
    model: str,
    usage_type: str = "inference",
    *,
    context_window: int | None = None,
    max_input_tokens: int | None = None,
    capabilities: Iterable[str] = (),
) -> str:
    """``llm.fleet.<kind>.<model-slug>[.ctx<N>][.cap.<caps>]``.

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
    capabilities: str | None = None
    if len(rest) >= 2 and rest[0] == CAPABILITY_SEGMENT:
        capabilities, rest = rest[1], rest[2:]
    if rest:
        raise LaneError(f"unexpected segments {'.'.join(rest)!r} in lane key {key!r}")
    return LaneKey(
        style="shared",
        kind=kind,
        model_slug=parts[3],
        context_window=context_window,
        capabilities=capabilities,
    )


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
    capabilities: Iterable[str] = (),
) -> str:
    """The inference lane of one model with the smallest ``ctx<N>`` that is at least ``needed_context``.

    Pass only lanes with live workers. ``model`` (its canonical alias) selects among several models;
    without it the candidates' inference lanes must all be of one model. Lanes match ``capabilities`` exactly
    (none: only lanes without a ``cap`` segment). Embedding, offering and window-less lanes are ignored.
    """
    needed = _positive_int(needed_context, "needed context")
    model_slug = None if model is None else _required_slug(model, "model")
    capability_slug = capability_segment(capabilities)
    lanes = [
        lane
        for lane in map(_as_lane_key, candidates)
        if lane.style == "shared"
        and lane.kind == "inference"
        and lane.context_window is not None
        and (model_slug is None or lane.model_slug == model_slug)
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
