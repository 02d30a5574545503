"""One stream cursor (``tasks.stream_reader.StreamCursor``) behind ``open_stream``, ``FleetStream.cancel`` and
``astream``: it plans every read (the resume position, each XREAD's batch and its block until the one deadline,
``stream_deadline``) and decodes what comes back; the sync and async readers only do the I/O, so they read the
same items from the same position."""

from __future__ import annotations

import asyncio
import time

import pytest

from provider.protocol import FleetError
from provider.vllm.models import StreamChunk
from tasks.stream_entries import StreamReset
from tasks.stream_reader import READ_BATCH, READ_BLOCK_MS, StreamCursor
from tests.tasks.conftest import CHAT_MODEL, Fleet

PROMPT = [{"role": "user", "content": "one cursor reads every stream the same way"}]


def test_a_fresh_cursor_reads_from_the_start_in_batches_blocking_at_most_a_second() -> None:
    cursor = StreamCursor("0-0", time.time() + 60.0)
    assert cursor.reread is False
    read = cursor.next_read("stream-key")
    assert read["streams"] == {"stream-key": "0-0"}
    assert read["count"] == READ_BATCH
    assert 0 < read["block"] <= READ_BLOCK_MS


def test_a_resumed_cursor_reads_its_entry_again_then_after_it() -> None:
    cursor = StreamCursor("1700000000000-3/2", time.time() + 60.0)  # two chunks of that entry already read
    assert cursor.reread is True
    assert cursor.reread_range() == ("1700000000000-3", "1700000000000-3")
    assert cursor.next_read("k")["streams"] == {"k": "1700000000000-3"}


def test_a_read_past_the_deadline_is_a_fleet_timeout() -> None:
    cursor = StreamCursor("0-0", time.time() - 0.01)
    with pytest.raises(FleetError) as info:
        cursor.next_read("k")
    assert info.value.code == "fleet_timeout"
    assert info.value.retryable is True


def test_an_xread_reply_gives_its_entries_and_a_timed_out_one_none() -> None:
    entries = [(b"1-0", {b"k": b"v"}), (b"2-0", {b"k": b"w"})]
    assert StreamCursor.entries_of([[b"stream-key", entries]]) == entries
    assert StreamCursor.entries_of(None) == []
    assert StreamCursor.entries_of([]) == []


def _shown(items: list[StreamChunk | StreamReset]) -> list[str]:
    return [("<reset>" if isinstance(item, StreamReset) else item.content or "") for item in items]


def test_the_sync_and_async_readers_read_the_same_items_from_any_position(fleet: Fleet) -> None:
    from tasks import open_stream, stream_chat
    from tasks.aio import astream

    result = stream_chat.delay(model=CHAT_MODEL, messages=PROMPT, max_tokens=32)
    whole = open_stream(result)
    positions: list[str] = []
    items: list[StreamChunk | StreamReset] = []
    for item in whole:
        items.append(item)
        positions.append(whole.last_id)
    assert len(items) >= 3

    async def read_async(start_id: str) -> list[StreamChunk | StreamReset]:
        return [item async for item in astream(result, start_id=start_id)]

    for start_id in ("0-0", positions[0], positions[len(positions) // 2]):
        sync_items = list(open_stream(result, start_id=start_id))
        async_items = asyncio.run(read_async(start_id))
        assert _shown(sync_items) == _shown(async_items)
        skipped = 0 if start_id == "0-0" else positions.index(start_id) + 1
        assert _shown(sync_items) == _shown(items[skipped:])
