"""Choosing the lane for a request from the shared registry, and Celery's router over finished envelopes.

Producers read live offerings from Redis (cached in-process for ``ROUTE_CACHE_S``): a chat goes to the
smallest ``ctx<N>`` lane of its model that fits prompt + max_tokens (``_fitting_offering`` says what happens
when none does), qualified by ``.cap.tools`` when it sends tools so that only instances with a tool parser
take it; an embedding goes to the model's embed lane, a management call to its instance's own queue.
Anything no live worker can serve fails here, at submit.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from typing import Any

from kombu import Queue

from provider.fleet.lanes import slug
from provider.fleet.offerings import LANE_CAPABILITIES, Offering, canonical_alias_for
from provider.fleet.registry import CachedRegistry
from provider.fleet.token_estimate import estimate_tokens, needed_context
from provider.protocol import FleetUnavailable, NoFleetQueue
from tasks.brokers import EventReader
from tasks.metrics import REFUSED_REGISTRY_RECORDS
from tasks.queues import CONTROL_QUEUE, management_queue_name
from tasks.runtime import FleetRuntime, runtime

__all__ = [
    "ROUTE_CACHE_S",
    "LaneChoice",
    "invalidate_route_cache",
    "pick_lane",
    "pick_management_queue",
    "queue_for",
    "route_task",
]

ROUTE_CACHE_S = 1.0
log = logging.getLogger("tasks.routing")
_INFERENCE_OPERATIONS = {"chat", "stream_chat"}

_views_lock = threading.Lock()
_views: dict[int, CachedRegistry] = {}


def _view(rt: FleetRuntime) -> CachedRegistry:
    """This runtime's cached registry, with a follower that invalidates it on registry events."""
    key = id(rt)
    view = _views.get(key)
    if view is None:
        with _views_lock:
            view = _views.get(key)
            if view is None:
                view = CachedRegistry(rt.registry, ttl_s=ROUTE_CACHE_S)
                _views.clear()  # one runtime at a time: a reconfigured process forgets the old one
                _views[key] = view
                threading.Thread(target=_follow_events, args=(rt, view), name="registry-events", daemon=True).start()
    return view


def invalidate_route_cache() -> None:
    """Forget the cached offerings (after a registry event, or in tests)."""
    for view in list(_views.values()):
        view.invalidate()


def _follow_events(rt: FleetRuntime, view: CachedRegistry) -> None:
    """Invalidate the cache on every registry event but heartbeats, while this runtime is current.

    Events come from the ``llm.registry`` topic exchange on RabbitMQ, from the Redis stream otherwise.
    """
    reader: EventReader | None = None
    while runtime() is rt:
        try:
            if reader is None:
                reader = rt.broker.event_reader(rt.redis, rt.keys)
            for item in reader.read(timeout_s=1.0):
                if item.event.event_type != "offering_heartbeat":
                    view.invalidate()
        except Exception:  # a follower must never break a producer; the TTL still bounds staleness
            log.debug("registry event follower paused", exc_info=True)
            if reader is not None:
                reader.close()
                reader = None
            time.sleep(1.0)
    if reader is not None:
        reader.close()


def _live_offerings(rt: FleetRuntime) -> list[Offering]:
    aliases = rt.settings.model_aliases
    return [o for o in _view(rt).all() if o.enabled and _is_routable(o) and _alias_is_its_own(o, aliases)]


def _is_routable(offering: Offering) -> bool:
    return offering.status != "unavailable"


_warned_aliases: set[str] = set()


def _alias_is_its_own(offering: Offering, aliases: dict[str, dict[str, str]]) -> bool:
    """Whether an offering's lane alias is its model's own (the model itself, or its alias in the alias table).

    A record whose alias names anything else would send that model's requests to a lane of the record's choosing:
    it is skipped (logged and counted once per offering).
    """
    alias = offering.canonical_alias
    if alias == offering.model.strip() or alias == canonical_alias_for(
        offering.model, aliases, offering.provider_family
    ):
        return True
    if offering.offering_id not in _warned_aliases:
        _warned_aliases.add(offering.offering_id)
        REFUSED_REGISTRY_RECORDS.labels(reason="offering_alias_mismatch").inc()
        log.warning("skipping offering %s: its alias is not its model's own", offering.offering_id)
    return False


def _matches_model(offering: Offering, model: str) -> bool:
    """The exact served id, or the exact alias (the one the alias table gives it)."""
    return model in (offering.model, offering.canonical_alias)


def _unknown_model(model: str, offerings: list[Offering]) -> NoFleetQueue:
    """No offering serves exactly this name: name a close match (equal once slugged) when there is one."""
    wanted = slug(model)
    close = sorted({name for o in offerings for name in (o.model, o.canonical_alias) if slug(name) == wanted})
    if close:
        return NoFleetQueue(f"unknown model {model!r}; did you mean {close[0]!r}?")
    known = sorted({o.canonical_alias for o in offerings})
    return NoFleetQueue(
        f"no live worker serves model {model!r} (served: {', '.join(known) or 'none'})",
    )


class LaneChoice(dict[str, Any]):
    """The lane picked for a request and the offering behind it (``lane``, ``offering_id``, ``instance``, and
    ``model``: the offering's exact served id, what the request must name)."""


def _required_capabilities(operation: str, params: dict[str, Any]) -> list[str]:
    required: list[str] = []
    if operation == "stream_chat":
        required.append("streaming")
    elif operation == "chat":
        required.append("chat")
    elif operation == "embed":
        required.append("embedding")
    if params.get("tools"):
        required.append("tools")
    if _has_images(params.get("messages") or []):
        required.append("vision")
    return required


def _has_images(messages: list[Any]) -> bool:
    """Whether any message carries an image part (OpenAI-style content lists)."""
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list) and any(
            isinstance(part, dict) and part.get("type") in ("image_url", "input_image") for part in content
        ):
            return True
    return False


def pick_lane(operation: str, model: str, params: dict[str, Any], rt: FleetRuntime | None = None) -> LaneChoice:
    """The lane a request must be published to; raises ``NoFleetQueue`` when none can serve it."""
    rt = rt or runtime()
    live = _live_offerings(rt)
    offerings = [o for o in live if _matches_model(o, model)]
    usage = "embedding" if operation == "embed" else "inference"
    if not offerings:
        raise _unknown_model(model, live)
    required = _required_capabilities(operation, params)
    eligible = [o for o in offerings if o.eligible_for(usage_type=usage, required_capabilities=required)]
    if not eligible:
        raise NoFleetQueue(
            f"model {model!r} has no live offering that supports {' and '.join(required) or usage} "
            f"(its offerings are for {', '.join(sorted({o.usage_type for o in offerings}))})",
        )
    eligible = [o for o in eligible if o.status != "degraded"]  # an open circuit: route elsewhere or fail fast
    if not eligible:
        raise FleetUnavailable(
            f"every instance serving {model!r} has an open circuit; try again shortly",
        )
    style = rt.settings.lanes.style
    if usage == "embedding":
        chosen = eligible[0]
        return LaneChoice(
            lane=chosen.lane(style), offering_id=chosen.offering_id, instance=chosen.instance_id, model=chosen.model
        )
    prompt = estimate_tokens(params.get("messages") or [], tools=params.get("tools"))
    chosen = _fitting_offering(eligible, prompt, params.get("max_tokens"), model)
    if style == "offering":
        return LaneChoice(
            lane=chosen.offering_lane, offering_id=chosen.offering_id, instance=chosen.instance_id, model=chosen.model
        )
    lane_capabilities = [cap for cap in LANE_CAPABILITIES if cap in required]
    lane = chosen.lane("shared", capabilities=lane_capabilities)
    return LaneChoice(lane=lane, offering_id=chosen.offering_id, instance="any", model=chosen.model)


def _fitting_offering(offerings: list[Offering], prompt_estimate: int, max_tokens: Any, model: str) -> Offering:
    """The offering whose lane a chat goes to, judged the way vLLM 0.32 judges a request.

    vLLM refuses ``max_tokens`` above the window and a prompt longer than the window; prompt + max_tokens over
    the window it serves, with max_tokens shortened to what fits. So: the smallest window with room for the
    prompt estimate and the full max_tokens; else the largest window (vLLM shortens the reply, and the result
    says so): the estimate is generous (three bytes a token), so vLLM, not the estimate, decides whether a
    prompt is really too long (``bad_request``). Only a max_tokens larger than every window is refused here,
    as vLLM would refuse it.
    """
    wanted = max_tokens if isinstance(max_tokens, int) and not isinstance(max_tokens, bool) else None

    def window(offering: Offering) -> int:
        return offering.context_window or 0

    allowed = [o for o in offerings if wanted is None or window(o) >= wanted]
    if not allowed:
        largest = max(window(o) for o in offerings)
        raise NoFleetQueue(
            f"max_tokens={wanted} is larger than every context window of model {model!r} (the largest is "
            f"{largest}); vLLM refuses it",
        )
    full = [o for o in allowed if window(o) >= needed_context(prompt_estimate, wanted)]
    if full:
        return min(full, key=window)
    return max(allowed, key=window)


def pick_management_queue(instance: str, rt: FleetRuntime | None = None) -> str:
    """The management queue of one live instance; raises ``NoFleetQueue`` when none serves it."""
    rt = rt or runtime()
    record = rt.registry.instance(instance)
    if record is None:
        known = sorted(r["name"] for r in rt.registry.instances())
        raise NoFleetQueue(
            f"no live worker serves instance {instance!r} (live: {', '.join(known) or 'none'})",
        )
    return str(record.get("queue") or management_queue_name(slug(instance)))


def live_instances(rt: FleetRuntime | None = None) -> list[str]:
    """Names of every instance a live worker serves (for fan-out)."""
    rt = rt or runtime()
    return sorted(str(r["name"]) for r in rt.registry.instances())


def queue_for(name: str, rt: FleetRuntime | None = None) -> Queue:
    """The kombu declaration of a lane or management queue, the same everywhere."""
    rt = rt or runtime()
    return rt.broker.lane_queue(name)


def route_task(
    name: str,
    args: Sequence[Any],
    kwargs: dict[str, Any],
    options: dict[str, Any],
    task: Any = None,
    **_: Any,
) -> dict[str, Any] | None:
    """Celery router: an envelope names its lane (``routing_key``); send it there with the lane's declaration."""
    if options.get("queue"):
        return None
    if args and isinstance(args[0], dict) and isinstance(args[0].get("routing_key"), str):
        return {"queue": queue_for(args[0]["routing_key"])}
    if name.startswith("vllm."):
        return {"queue": queue_for(CONTROL_QUEUE)}
    return None
