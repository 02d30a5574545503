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
import time
from collections.abc import AsyncIterator
from typing import Any

import redis.asyncio as aioredis

from provider.protocol import FleetTimeout
from provider.vllm.models import StreamChunk
from tasks.producer import FleetResult, FleetTask
from tasks.runtime import runtime
from tasks.streams import READ_BATCH, StreamCursor, StreamReset

__all__ = ["astream", "gather_result", "submit"]

_READ_BLOCK_MS = 1000


async def submit(task: FleetTask, **kwargs: Any) -> Any:
    """``task.delay(**kwargs)`` without blocking the event loop."""
    return await asyncio.to_thread(task.delay, **kwargs)


async def gather_result(result: FleetResult, timeout: float | None = None) -> Any:
    """The opened response of a submitted request (raises ``FleetError`` subclasses like ``.get()``)."""
    return await asyncio.to_thread(result.get, timeout)


async def astream(
    result: FleetResult | str, *, start_id: str = "0-0", timeout_s: float | None = None
) -> AsyncIterator[StreamChunk | StreamReset]:
    """Chunks of a ``stream_chat`` task as they arrive, from ``start_id``; ends at the stream's end."""
    rt = runtime()
    task_id = result if isinstance(result, str) else result.id
    deadline = getattr(result, "deadline", None) or time.time() + (timeout_s or rt.settings.timeouts.stream_s)
    key = rt.keys.stream(task_id)
    client = aioredis.Redis.from_url(rt.settings.redis_url)
    sealer = rt.stream_sealer(task_id)
    cursor = StreamCursor(start_id)
    try:
        entries: Any = await client.xrange(key, min=cursor.entry_id, max=cursor.entry_id) if cursor.reread else []
        while True:
            for _, item in cursor.items(entries, sealer):
                yield item
            if cursor.ended:
                return
            remaining_ms = int((deadline - time.time()) * 1000)
            if remaining_ms <= 0:
                raise FleetTimeout("the stream did not finish before its deadline")
            block_ms = min(_READ_BLOCK_MS, remaining_ms)
            reply: Any = await client.xread({key: cursor.entry_id}, count=READ_BATCH, block=block_ms)
            entries = reply[0][1] if reply else []
    finally:
        await client.aclose()
