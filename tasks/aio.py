"""The producer API for asyncio apps: submit, await a result, and ``async for`` over a stream.

    from tasks import chat, stream_chat
    from tasks.aio import gather_result, astream, submit

    reply = await gather_result(await submit(chat, model="m", messages=[...]))
    async for chunk in astream(await submit(stream_chat, model="m", messages=[...])):
        ...

Publishing and waiting use Celery's synchronous client in a worker thread (it has no asyncio client);
streams are read with ``redis.asyncio`` so thousands of readers cost no threads.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import redis.asyncio as aioredis

from provider.vllm.models import StreamChunk
from tasks.producer import FleetResult, FleetTask
from tasks.runtime import runtime
from tasks.stream_entries import StreamReset
from tasks.stream_reader import StreamCursor, stream_deadline

__all__ = ["astream", "gather_result", "submit"]


async def submit(task: FleetTask, **kwargs: Any) -> Any:
    """``task.delay(**kwargs)`` without blocking the event loop."""
    return await asyncio.to_thread(task.delay, **kwargs)


async def gather_result(result: FleetResult, timeout: float | None = None) -> Any:
    """The opened response of a submitted request (raises ``FleetError`` like ``.get()``)."""
    return await asyncio.to_thread(result.get, timeout)


async def astream(
    result: FleetResult | str, *, start_id: str = "0-0", timeout_s: float | None = None
) -> AsyncIterator[StreamChunk | StreamReset]:
    """Chunks of a ``stream_chat`` task as they arrive, from ``start_id``; ends at the stream's end."""
    rt = runtime()
    task_id = result if isinstance(result, str) else result.id
    deadline = stream_deadline(getattr(result, "deadline", None), timeout_s, rt.settings.timeouts.stream_s)
    key = rt.keys.stream(task_id)
    client = aioredis.Redis.from_url(rt.settings.redis_url)
    sealer = rt.stream_sealer(task_id)
    cursor = StreamCursor(start_id, deadline)
    try:
        entries: Any = await client.xrange(key, *cursor.reread_range()) if cursor.reread else []
        while True:
            for _, item in cursor.items(entries, sealer):
                yield item
            if cursor.ended:
                return
            entries = cursor.entries_of(await client.xread(**cursor.next_read(key)))
    finally:
        await client.aclose()
