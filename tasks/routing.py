"""Choosing the lane for a request from the shared registry, and Celery's router over finished envelopes.

Producers read live offerings from Redis (cached in-process for ``ROUTE_CACHE_S``): a chat goes to the
smallest ``ctx<N>`` lane of its model that fits prompt + max_tokens, an embedding to the model's embed lane,
a management call to its instance's own queue. Anything no live worker can serve fails here, at submit.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from typing import Any

from kombu import Queue

from provider.event_bus import AmqpEventReader, read_events
from provider.lanes import LaneError, choose_lane, estimate_tokens, needed_context, slug
from provider.offerings import Offering
from provider.protocol import FleetError
from provider.registry import CachedRegistry
from tasks.queues import CONTROL_QUEUE, lane_queue, management_queue_name
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
_INFERENCE_OPERATIONS = {"chat", "stream_chat", "count_tokens"}

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
    last_id = "$"
    reader: AmqpEventReader | None = None
    while runtime() is rt:
        try:
            if rt.amqp:
                if reader is None:
                    reader = AmqpEventReader(rt.settings.broker_url, binding_key="llm.registry.#")
                    reader.open()
                received = reader.get(timeout_s=1.0)
                events = [] if received is None else [received]
            else:
                events = read_events(rt.redis, rt.keys.events, after=last_id, count=100, block_ms=1000)
            for item in events:
                last_id = item.entry_id or last_id
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
    return [o for o in _view(rt).all() if o.enabled and _is_routable(o)]


def _is_routable(offering: Offering) -> bool:
    return offering.status != "unavailable"


def _matches_model(offering: Offering, model: str) -> bool:
    wanted = slug(model)
    return model in (offering.model, offering.canonical_alias) or wanted == slug(offering.canonical_alias)


class LaneChoice(dict[str, Any]):
    """The lane picked for a request and the offering behind it (``lane``, ``offering_id``, ``instance``)."""


def _required_capabilities(operation: str, params: dict[str, Any]) -> list[str]:
    required: list[str] = []
    if operation == "stream_chat":
        required.append("streaming")
    elif operation in ("chat", "count_tokens"):
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
    """The lane a request must be published to; raises ``FleetError(no_fleet_queue)`` when none can serve it."""
    rt = rt or runtime()
    offerings = [o for o in _live_offerings(rt) if _matches_model(o, model)]
    usage = "embedding" if operation == "embed" else "inference"
    if not offerings:
        known = sorted({o.canonical_alias for o in _live_offerings(rt)})
        raise FleetError(
            f"no live worker serves model {model!r} (served: {', '.join(known) or 'none'})",
            code="no_fleet_queue",
            retryable=False,
        )
    required = _required_capabilities(operation, params)
    eligible = [o for o in offerings if o.eligible_for(usage_type=usage, required_capabilities=required)]
    if not eligible:
        raise FleetError(
            f"model {model!r} has no live offering for {operation} with {', '.join(required) or usage}",
            code="no_fleet_queue",
            retryable=False,
        )
    eligible = [o for o in eligible if o.status != "degraded"]  # an open circuit: route elsewhere or fail fast
    if not eligible:
        raise FleetError(
            f"every instance serving {model!r} has an open circuit; try again shortly",
            code="fleet_unavailable",
            retryable=True,
        )
    style = rt.settings.lanes.style
    if usage == "embedding":
        chosen = eligible[0]
        return LaneChoice(lane=chosen.lane(style), offering_id=chosen.offering_id, instance=chosen.instance_id)
    needed = needed_context(
        estimate_tokens(params.get("messages") or [], tools=params.get("tools")), params.get("max_tokens")
    )
    if style == "offering":
        fitting = [o for o in eligible if (o.context_window or 0) >= needed]
        if not fitting:
            raise _no_fit(model, needed)
        chosen = min(fitting, key=lambda o: o.context_window or 0)
        return LaneChoice(lane=chosen.offering_lane, offering_id=chosen.offering_id, instance=chosen.instance_id)
    try:
        lane = choose_lane(eligible, needed, model=eligible[0].canonical_alias)
    except LaneError as exc:
        raise _no_fit(model, needed) from exc
    chosen = next(o for o in eligible if o.shared_lane == lane)
    return LaneChoice(lane=lane, offering_id=chosen.offering_id, instance="any")


def _no_fit(model: str, needed: int) -> FleetError:
    return FleetError(
        f"no lane of model {model!r} has a context window of {needed} tokens (prompt estimate + max_tokens)",
        code="no_fleet_queue",
        retryable=False,
    )


def pick_management_queue(instance: str, rt: FleetRuntime | None = None) -> str:
    """The management queue of one live instance; raises ``FleetError(no_fleet_queue)`` when none serves it."""
    rt = rt or runtime()
    record = rt.registry.instance(instance)
    if record is None:
        known = sorted(r["name"] for r in rt.registry.instances())
        raise FleetError(
            f"no live worker serves instance {instance!r} (live: {', '.join(known) or 'none'})",
            code="no_fleet_queue",
            retryable=False,
        )
    return str(record.get("queue") or management_queue_name(slug(instance)))


def live_instances(rt: FleetRuntime | None = None) -> list[str]:
    """Names of every instance a live worker serves (for fan-out)."""
    rt = rt or runtime()
    return sorted(str(r["name"]) for r in rt.registry.instances())


def queue_for(name: str, rt: FleetRuntime | None = None) -> Queue:
    """The kombu declaration of a lane or management queue, the same everywhere."""
    rt = rt or runtime()
    return lane_queue(name, rt.settings.lanes, rt.amqp)


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
