"""The producer API of the vLLM Celery fleet.

    from tasks import chat, embed, stream_chat, open_stream

    reply = chat.delay(model="qwen3-6-27b", messages=[{"role": "user", "content": "Hi"}]).get()
    result = stream_chat.delay(model="qwen3-6-27b", messages=[...])
    for chunk in open_stream(result):
        print(chunk.content or "", end="")

Results are opened response envelopes (dicts); failures raise ``FleetError`` with a ``code``. Each task name here
resolves to the current app's task (``configure(settings)`` switches the app; ``tasks.app``).
"""

from __future__ import annotations

from provider.protocol import FleetError
from provider.vllm.models import StreamChunk
from tasks.app import app, configure, fleet_task
from tasks.producer import FleetGroupResult, FleetResult
from tasks.runtime import runtime
from tasks.stream_entries import StreamReset
from tasks.stream_reader import FleetStream, cancel_stream, stream_deadline

__all__ = [
    "FleetError",
    "FleetGroupResult",
    "FleetResult",
    "FleetStream",
    "StreamChunk",
    "StreamReset",
    "app",
    "cancel",
    "chat",
    "configure",
    "discover",
    "embed",
    "health",
    "is_sleeping",
    "list_models",
    "open_stream",
    "readiness",
    "reset_mm_cache",
    "reset_prefix_cache",
    "sleep",
    "stream_chat",
    "version",
    "wake_up",
]

# The fleet's tasks (``tasks.fleet``), as the current app has them.
chat = fleet_task("chat")
stream_chat = fleet_task("stream_chat")
embed = fleet_task("embed")
health = fleet_task("health")
readiness = fleet_task("readiness")
version = fleet_task("version")
list_models = fleet_task("list_models")
is_sleeping = fleet_task("is_sleeping")
sleep = fleet_task("sleep")
wake_up = fleet_task("wake_up")
reset_prefix_cache = fleet_task("reset_prefix_cache")
reset_mm_cache = fleet_task("reset_mm_cache")
discover = fleet_task("discover")


def open_stream(result: FleetResult | str, *, start_id: str = "0-0", timeout_s: float | None = None) -> FleetStream:
    """Chunks of a ``stream_chat`` task, live or late, from ``start_id`` (``"0-0"`` = the beginning)."""
    rt = runtime()
    task_id = result if isinstance(result, str) else result.id
    deadline = stream_deadline(getattr(result, "deadline", None), timeout_s, rt.settings.timeouts.stream_s)
    return FleetStream(
        task_id,
        client=rt.redis,
        key=rt.keys.stream(task_id),
        cancel_key=rt.keys.cancel(task_id),
        deadline=deadline,
        sealer=rt.stream_sealer(task_id),
        start_id=start_id,
    )


def cancel(result: FleetResult | str, *, revoke: bool = True) -> None:
    """Give up on a request: a stream stops within two relay round trips and a token (measured in the README);
    a queued task is revoked."""
    rt = runtime()
    task_id = result if isinstance(result, str) else result.id
    cancel_stream(rt.redis, rt.keys.cancel(task_id))
    if revoke:
        app.control.revoke(task_id)
