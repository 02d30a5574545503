"""The fleet's Celery tasks, registered on an app by ``register_fleet_tasks``. Names are stable: apps and other
languages send them by name.

| task | operation | goes to |
|---|---|---|
| ``vllm.chat`` | chat completion | ``llm.fleet.inference.<model>.ctx<N>`` |
| ``vllm.stream_chat`` | streamed chat, relayed chunk by chunk into Redis | same lanes as chat |
| ``vllm.embed`` | embeddings | ``llm.fleet.embed.<model>`` |
| ``vllm.<management>`` | management (below) | ``llm.fleet.mgmt.<instance>``; ``instance="all"`` fans out |

One task per operation of ``provider.protocol.OPERATIONS`` (inference, then management: the one list), named
``vllm.<operation>``. Each takes one argument, the request envelope, and returns a response envelope. Producers
reach them as ``from tasks import chat, ...`` (``tasks.app.fleet_task``: whichever app is current).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from celery import Celery, Task

from provider.protocol import OPERATIONS
from tasks.producer import FleetTask

if TYPE_CHECKING:
    from tasks.pipeline import Runner

__all__ = ["TASK_PREFIX", "register_fleet_tasks", "task_name"]

TASK_PREFIX = "vllm."


def task_name(operation: str) -> str:
    """The stable Celery name of an operation's task: ``vllm.<operation>``."""
    return f"{TASK_PREFIX}{operation}"


def _runner(operation: str) -> Runner:
    """The worker's runner of an operation (worker code: imported when a task runs, never by producers)."""
    from tasks import execution
    from tasks.management import run_management

    runners: dict[str, Runner] = {"chat": execution.run_chat, "stream_chat": execution.run_stream}
    runners["embed"] = execution.run_embed
    return runners.get(operation, run_management)


def _run(self: Task[Any, Any], envelope: dict[str, Any]) -> Any:
    """Run one fleet request envelope through the worker pipeline; returns the response envelope."""
    from tasks.execution import execute

    operation = self.operation  # type: ignore[attr-defined]
    return execute(self, envelope, _runner(operation))


_DOCS = {
    "chat": "A chat completion.",
    "stream_chat": "A chat whose chunks are relayed into Redis as they arrive; the result is the assembled message.",
    "embed": "Embeddings for one text or a batch.",
}


def register_fleet_tasks(app: Celery) -> dict[str, FleetTask]:
    """Register one task per operation on ``app`` (bound, envelope in, envelope out); operation → task."""
    registered: dict[str, FleetTask] = {}
    for operation in OPERATIONS:
        doc = _DOCS.get(operation, f"Management: {operation} on one instance (or every instance with instance='all').")
        decorator: Callable[[Callable[..., Any]], FleetTask] = app.task(
            name=task_name(operation),
            base=FleetTask,
            bind=True,
            operation=operation,
            typing=False,
            shared=False,  # this app's only: each app gets its own, from here
            __doc__=doc,
        )
        registered[operation] = decorator(_run)
    return registered
