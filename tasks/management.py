"""Management operations on one instance (worker side): health, readiness, version, models, sleep, wake-up,
cache resets and discovery, each a call of the instance's ``VllmClient``; one handler per
``provider.protocol.MANAGEMENT_OPERATIONS`` (a test keeps them in step)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from provider.vllm.errors import ProviderError
from tasks.pipeline import RequestContext
from tasks.worker import ServedInstance, worker_fleet

__all__ = ["HANDLERS", "run_management"]

_Handler = Callable[[ServedInstance, dict[str, Any]], Any]


def _health(served: ServedInstance, params: dict[str, Any]) -> Any:
    return {"live": served.client.health()}


def _readiness(served: ServedInstance, params: dict[str, Any]) -> Any:
    answer = served.client.readiness().model_dump(mode="json")
    try:  # vLLM's own load signal, beside liveness
        load = served.client.metrics().model_dump(mode="json", include={"running", "waiting", "kv_cache_usage"})
        answer["load"] = load
    except ProviderError as exc:
        answer["load"] = {"error": exc.code}
    return answer


def _version(served: ServedInstance, params: dict[str, Any]) -> Any:
    return {"version": served.client.version()}


def _list_models(served: ServedInstance, params: dict[str, Any]) -> Any:
    return {"models": [m.model_dump(mode="json") for m in served.client.list_models()]}


def _is_sleeping(served: ServedInstance, params: dict[str, Any]) -> Any:
    return {"is_sleeping": served.client.is_sleeping()}


def _sleep(served: ServedInstance, params: dict[str, Any]) -> Any:
    return served.client.sleep(level=int(params.get("level", 1)), mode=params.get("mode"))


def _wake_up(served: ServedInstance, params: dict[str, Any]) -> Any:
    answer = served.client.wake_up(tags=params.get("tags"))
    # vLLM says "awake" even when only some parts woke (tags=weights): report whether it still sleeps
    answer["is_sleeping"] = served.client.is_sleeping()
    worker_fleet().refresh(served.name)  # a server that slept through discovery offers its models now
    return answer


def _reset_prefix_cache(served: ServedInstance, params: dict[str, Any]) -> Any:
    success = served.client.reset_prefix_cache(
        reset_running_requests=bool(params.get("reset_running_requests", False)),
        reset_external=bool(params.get("reset_external", False)),
    )
    return {"success": success}


def _reset_mm_cache(served: ServedInstance, params: dict[str, Any]) -> Any:
    served.client.reset_mm_cache()
    return {"success": True}


def _discover(served: ServedInstance, params: dict[str, Any]) -> Any:
    # live=False answers with the cached view, without touching the network
    offerings = worker_fleet().refresh(served.name) if params.get("live", True) else served.offerings
    return {"offerings": [o.offering_id for o in offerings], "live": served.live}


HANDLERS: dict[str, _Handler] = {
    "health": _health,
    "readiness": _readiness,
    "version": _version,
    "list_models": _list_models,
    "is_sleeping": _is_sleeping,
    "sleep": _sleep,
    "wake_up": _wake_up,
    "reset_prefix_cache": _reset_prefix_cache,
    "reset_mm_cache": _reset_mm_cache,
    "discover": _discover,
}


def run_management(ctx: RequestContext) -> dict[str, Any]:
    """Run one management operation on the named instance."""
    served = ctx.served
    handler = HANDLERS.get(ctx.verified.operation)
    if handler is None:  # the envelope's operation list and HANDLERS are kept in step by a test
        raise ValueError(f"unknown management operation {ctx.verified.operation}")
    return {"result": handler(served, ctx.verified.params), "metadata": {"instance": served.name}}
