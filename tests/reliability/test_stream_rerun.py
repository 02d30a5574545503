"""Scenario 1 of issue 15, mid-stream: a stream request re-run after its worker died (or handed back) continues
the entries' sequence numbers after what the first run wrote, so its reader sees a ``StreamReset`` and then the
complete answer: no ``stream_gap``, no entry skipped as a repeat. On real Redis, writer re-created as a new worker
process does it (the mid-stream SIGKILL scenario runs the same with real worker processes)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import pytest
import redis

from provider.protocol import FleetError, KeyRing, generated_security
from provider.vllm.models import StreamChunk
from tasks.metrics import FORGED_STREAM_ENTRIES
from tasks.stream_reader import read_stream
from tasks.streams import EntrySealer, StreamReset, StreamWriter

RING = KeyRing.from_settings(generated_security(kid="t1", encryption_kid="e1"))


@pytest.fixture
def key(state_client: redis.Redis) -> Iterator[str]:
    name = f"vft-rerun-{uuid.uuid4().hex}"
    yield name
    state_client.delete(name, name + ":cancel")


def _writer(state_client: redis.Redis, key: str, request_id: str) -> StreamWriter:
    """A fresh writer, as a worker process that never saw this stream makes it."""
    sealer = EntrySealer(RING, request_id, encrypt=True)
    return StreamWriter(state_client, key, max_len=10_000, retention_s=60, cancel_key=key + ":cancel", sealer=sealer)


def _skipped() -> float:
    """Stream entries readers in this process skipped so far (forged or repeated), from the metric."""
    return sum(s.value for m in FORGED_STREAM_ENTRIES.collect() for s in m.samples if s.name.endswith("_total"))


def _read(state_client: redis.Redis, key: str, request_id: str, start_id: str = "0-0") -> tuple[list[object], float]:
    sealer = EntrySealer(RING, request_id, encrypt=True)
    before = _skipped()
    items: list[object] = [
        "reset" if isinstance(item, StreamReset) else item.content
        for item in read_stream(state_client, key, deadline=time.time() + 5, sealer=sealer, start_id=start_id)
    ]
    return items, _skipped() - before


@pytest.mark.parametrize("written", [1, 7, 40])
def test_a_rerun_continues_the_sequence_after_the_dead_workers_entries(
    state_client: redis.Redis, key: str, written: int
) -> None:
    request_id = uuid.uuid4().hex
    first = _writer(state_client, key, request_id)
    assert first.resume() is False, "a new stream holds nothing to continue"
    for index in range(written):
        first.chunk(StreamChunk(content=f"old{index} "))
    first.flush()  # then its worker dies: no terminal entry

    rerun = _writer(state_client, key, request_id)  # the redelivered copy, in another process
    assert rerun.resume() is True
    rerun.reset(1)
    answer = [f"new{index} " for index in range(5)]
    for word in answer:
        rerun.chunk(StreamChunk(content=word))
    rerun.done({"finish_reason": "stop"})

    items, refused = _read(state_client, key, request_id)
    assert refused == 0, "no entry of the re-run was skipped as a repeat"
    assert "reset" in items
    after_reset = items[len(items) - 1 - items[::-1].index("reset") + 1 :]
    assert after_reset == answer, "after the reset: the complete answer"
    assert items[: items.index("reset")] == [f"old{index} " for index in range(written)]


def test_a_reader_that_was_midway_reads_on_through_the_rerun(state_client: redis.Redis, key: str) -> None:
    """A reader resuming from the dead run's last entry (where it had stopped) reads the reset and the new answer."""
    request_id = uuid.uuid4().hex
    first = _writer(state_client, key, request_id)
    for index in range(3):
        first.chunk(StreamChunk(content=f"old{index} "))
    first.flush()
    last: list[str] = []
    sealer = EntrySealer(RING, request_id, encrypt=True)
    deadline = time.time() + 0.5
    with pytest.raises(FleetError):  # the read stops at its short deadline: the stream has no end yet
        for _ in read_stream(state_client, key, deadline=deadline, sealer=sealer, on_entry=last.append):
            pass
    assert last, "the reader had read the dead run's entries"

    rerun = _writer(state_client, key, request_id)
    assert rerun.resume()
    rerun.reset(1)
    rerun.chunk(StreamChunk(content="new "))
    rerun.done({"finish_reason": "stop"})
    items, refused = _read(state_client, key, request_id, start_id=last[-1])
    assert (items, refused) == (["reset", "new "], 0)
