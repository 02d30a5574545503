"""The producer API of the vLLM Celery fleet.

    from tasks import chat, embed, stream_chat, open_stream

    reply = chat.delay(model="qwen3-6-27b", messages=[{"role": "user", "content": "Hi"}]).get()
    result = stream_chat.delay(model="qwen3-6-27b", messages=[...])
    for chunk in open_stream(result):
        print(chunk.content or "", end="")

Results are opened response envelopes (dicts); failures raise ``FleetError`` with a ``code``.
"""

from __future__ import annotations

from provider.protocol import FleetError
from provider.vllm.models import StreamChunk
from tasks.app import app
from tasks.fleet import (
    chat,
    discover,
    embed,
    health,
    is_sleeping,
    list_models,
    readiness,
    reset_mm_cache,
    reset_prefix_cache,
    sleep,
    stream_chat,
    version,
    wake_up,
)
from tasks.producer import FleetGroupResult, FleetResult
from tasks.runtime import configure, runtime
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
