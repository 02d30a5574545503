"""The fleet's Celery tasks. Names are stable: apps and other languages send them by name.

| task | operation | goes to |
|---|---|---|
| ``vllm.chat`` | chat completion | ``llm.fleet.inference.<model>.ctx<N>`` |
| ``vllm.stream_chat`` | streamed chat, relayed chunk by chunk into Redis | same lanes as chat |
| ``vllm.embed`` | embeddings | ``llm.fleet.embed.<model>`` |
| ``vllm.<management>`` | management (below) | ``llm.fleet.mgmt.<instance>``; ``instance="all"`` fans out |

Management tasks: one ``vllm.<operation>`` per ``provider.protocol.MANAGEMENT_OPERATIONS`` (the one list).

Each task takes one argument, the request envelope, and returns a response envelope.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from celery import Task

from provider.protocol import MANAGEMENT_OPERATIONS
from tasks.app import app
from tasks.producer import FleetTask

__all__ = [
    "MANAGEMENT_TASKS",
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
    from tasks.execution import execute, run_chat  # worker code: loaded by the worker's bootstep, never by producers

    return execute(self, envelope, run_chat)


@_fleet_task("vllm.stream_chat", "stream_chat")
def stream_chat(self: Task[Any, Any], envelope: dict[str, Any]) -> Any:
    """A chat whose chunks are relayed into Redis as they arrive; the result is the assembled message."""
    from tasks.execution import execute, run_stream

    return execute(self, envelope, run_stream)


@_fleet_task("vllm.embed", "embed")
def embed(self: Task[Any, Any], envelope: dict[str, Any]) -> Any:
    """Embeddings for one text or a batch."""
    from tasks.execution import execute, run_embed

    return execute(self, envelope, run_embed)


def _management_task(operation: str) -> FleetTask:
    @_fleet_task(f"vllm.{operation}", operation)
    def run(self: Task[Any, Any], envelope: dict[str, Any]) -> Any:
        from tasks.execution import execute
        from tasks.management import run_management

        return execute(self, envelope, run_management)

    run.__doc__ = f"Management: {operation} on one instance (or every instance with instance='all')."
    return run


MANAGEMENT_TASKS: dict[str, FleetTask] = {operation: _management_task(operation) for operation in MANAGEMENT_OPERATIONS}
# The producer API's names for them (``from tasks import sleep``).
health = MANAGEMENT_TASKS["health"]
readiness = MANAGEMENT_TASKS["readiness"]
version = MANAGEMENT_TASKS["version"]
list_models = MANAGEMENT_TASKS["list_models"]
is_sleeping = MANAGEMENT_TASKS["is_sleeping"]
reset_prefix_cache = MANAGEMENT_TASKS["reset_prefix_cache"]
reset_mm_cache = MANAGEMENT_TASKS["reset_mm_cache"]
sleep = MANAGEMENT_TASKS["sleep"]
wake_up = MANAGEMENT_TASKS["wake_up"]
discover = MANAGEMENT_TASKS["discover"]
