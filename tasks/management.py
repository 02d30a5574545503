"""Management operations on one instance (worker side): health, readiness, version, models, sleep, wake-up,
cache resets and discovery, each a call of the instance's ``VllmClient``."""

from __future__ import annotations

from typing import Any

from provider.vllm.errors import ProviderError
from tasks.pipeline import RequestContext

__all__ = ["run_management"]


def run_management(ctx: RequestContext) -> dict[str, Any]:
    """Run one management operation on the named instance."""
    served = ctx.served
    client = served.client
    params = ctx.verified.params
    operation = ctx.verified.operation
    answer: Any
    if operation == "health":
        answer = {"live": client.health()}
    elif operation == "readiness":
        answer = client.readiness().model_dump(mode="json")
        try:  # vLLM's own load signal, beside liveness
            answer["load"] = client.metrics().model_dump(mode="json", include={"running", "waiting", "kv_cache_usage"})
        except ProviderError as exc:
            answer["load"] = {"error": exc.code}
    elif operation == "version":
        answer = {"version": client.version()}
    elif operation == "list_models":
        answer = {"models": [m.model_dump(mode="json") for m in client.list_models()]}
    elif operation == "is_sleeping":
        answer = {"is_sleeping": client.is_sleeping()}
    elif operation == "reset_prefix_cache":
        answer = {
            "success": client.reset_prefix_cache(
                reset_running_requests=bool(params.get("reset_running_requests", False)),
                reset_external=bool(params.get("reset_external", False)),
            )
        }
    elif operation == "reset_mm_cache":
        client.reset_mm_cache()
        answer = {"success": True}
    elif operation == "sleep":
        answer = client.sleep(level=int(params.get("level", 1)), mode=params.get("mode"))
    elif operation == "wake_up":
        answer = client.wake_up(tags=params.get("tags"))
        # vLLM says "awake" even when only some parts woke (tags=weights): report whether it still sleeps
        answer["is_sleeping"] = client.is_sleeping()
        ctx.fleet.refresh(served.name)  # a server that slept through discovery offers its models now
    elif operation == "discover":
        # live=False answers with the cached view, without touching the network
        offerings = ctx.fleet.refresh(served.name) if params.get("live", True) else served.offerings
        answer = {"offerings": [o.offering_id for o in offerings], "live": served.live}
    else:  # the envelope's operation list and these branches are kept in step by a test
        raise ValueError(f"unknown management operation {operation}")
    return {"result": answer, "metadata": {"instance": served.name}}
