"""The fleet's Celery tasks. Names are stable: apps and other languages send them by name.

| task | operation | goes to |
|---|---|---|
| ``vllm.chat`` | chat completion | ``llm.fleet.inference.<model>.ctx<N>`` |
| ``vllm.stream_chat`` | streamed chat, relayed chunk by chunk into Redis | same lanes as chat |
| ``vllm.embed`` | embeddings | ``llm.fleet.embed.<model>`` |
| ``vllm.<management>`` | management (below) | ``llm.fleet.mgmt.<instance>``; ``instance="all"`` fans out |

Management tasks: ``vllm.health``, ``vllm.readiness``, ``vllm.version``, ``vllm.list_models``,
``vllm.is_sleeping``, ``vllm.reset_prefix_cache``, ``vllm.reset_mm_cache``, ``vllm.sleep``, ``vllm.wake_up``,
``vllm.discover``.

Each task takes one argument, the request envelope, and returns a response envelope.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from celery import Task

from provider.errors import ProviderError
from provider.protocol import VerifiedRequest
from tasks.app import app
from tasks.execution import execute, run_chat, run_embed, stream_chat_runner
from tasks.producer import FleetTask
from tasks.worker import ServedInstance, worker_fleet

__all__ = [
    "chat",
    "discover",
    "embed",
    "health",
    "is_sleeping",
    "list_models",
    "readiness",
    "reset_mm_cache",
    "reset_prefix_cache",
    "sleep",
    "stream_chat",
    "version",
    "wake_up",
]


_TaskBody = Callable[["Task[Any, Any]", dict[str, Any]], Any]


def _fleet_task(name: str, operation: str) -> Callable[[_TaskBody], FleetTask]:
    """Register a fleet task (bound, envelope-in envelope-out) under its stable name."""
    decorator: Callable[[_TaskBody], FleetTask] = app.task(
        name=name, base=FleetTask, bind=True, operation=operation, typing=False
    )
    return decorator


@_fleet_task("vllm.chat", "chat")
def chat(self: Task[Any, Any], envelope: dict[str, Any]) -> Any:
    """A chat completion."""
    return execute(self, envelope, run_chat)


@_fleet_task("vllm.stream_chat", "stream_chat")
def stream_chat(self: Task[Any, Any], envelope: dict[str, Any]) -> Any:
    """A chat whose chunks are relayed into Redis as they arrive; the result is the assembled message."""
    return execute(self, envelope, stream_chat_runner(self))


@_fleet_task("vllm.embed", "embed")
def embed(self: Task[Any, Any], envelope: dict[str, Any]) -> Any:
    """Embeddings for one text or a batch."""
    return execute(self, envelope, run_embed)


def _management(verified: VerifiedRequest, served: ServedInstance) -> dict[str, Any]:
    """Run one management operation on the named instance."""
    client = served.client
    params = verified.params
    operation = verified.operation
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
        worker_fleet().refresh(served.name)  # a server that slept through discovery offers its models now
    elif operation == "discover":
        # live=False answers with the cached view, without touching the network
        offerings = worker_fleet().refresh(served.name) if params.get("live", True) else served.offerings
        answer = {"offerings": [o.offering_id for o in offerings], "live": served.live}
    else:  # the envelope's operation list and these branches are kept in step by a test
        raise ValueError(f"unknown management operation {operation}")
    return {"result": answer, "metadata": {"instance": served.name}}


def _management_task(name: str) -> Any:
    operation = name.split(".", 1)[1]

    @_fleet_task(name, operation)
    def run(self: Task[Any, Any], envelope: dict[str, Any]) -> Any:
        return execute(self, envelope, _management)

    run.__doc__ = f"Management: {operation} on one instance (or every instance with instance='all')."
    return run


health = _management_task("vllm.health")
readiness = _management_task("vllm.readiness")
version = _management_task("vllm.version")
list_models = _management_task("vllm.list_models")
is_sleeping = _management_task("vllm.is_sleeping")
reset_prefix_cache = _management_task("vllm.reset_prefix_cache")
reset_mm_cache = _management_task("vllm.reset_mm_cache")
sleep = _management_task("vllm.sleep")
wake_up = _management_task("vllm.wake_up")
discover = _management_task("vllm.discover")
