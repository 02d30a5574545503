"""Stream entries on real Redis: chunks batched into one sealed entry, read and resumed exactly, chunk by chunk."""

from __future__ import annotations

import functools
import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from hypothesis import given, settings
from hypothesis import strategies as st

from provider.protocol import FleetError, KeyRing, generated_security
from provider.vllm.models import StreamChunk
from tasks.streams import KIND_CHUNK, KIND_CHUNKS, KIND_DONE, EntrySealer, StreamWriter, read_stream

pytestmark = pytest.mark.integration


@pytest.fixture
def key(state_client: redis.Redis) -> Iterator[str]:
    name = f"vft-entries-{uuid.uuid4().hex}"
    yield name
    state_client.delete(name, name + ":cancel")


@pytest.fixture(params=["sealed", "plain"])
def sealer(request: pytest.FixtureRequest) -> EntrySealer:
    ring = KeyRing.from_settings(generated_security(kid="t1", encryption_kid="e1"))
    return EntrySealer(ring, "req-1", encrypt=request.param == "sealed")


def chunk_json(text: str) -> bytes:
    return StreamChunk(content=text).model_dump_json(exclude_none=True, exclude_defaults=True).encode()


def add(state_client: redis.Redis, key: str, sealer: EntrySealer, kind: bytes, plain: bytes) -> str:
    fields: Any = sealer.fields(kind, plain)
    entry_id: Any = state_client.xadd(key, fields)
    return entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)


def read(
    state_client: redis.Redis, key: str, sealer: EntrySealer, start_id: str = "0-0"
) -> tuple[list[str], list[str]]:
    positions: list[str] = []
    texts = [
        getattr(item, "content", None) or ""
        for item in read_stream(
            state_client, key, deadline=time.time() + 5, sealer=sealer, start_id=start_id, on_entry=positions.append
        )
    ]
    return texts, positions


def test_a_batch_entry_reads_as_its_chunks_and_resumes_inside_it(
    state_client: redis.Redis, key: str, sealer: EntrySealer
) -> None:
    batch = add(state_client, key, sealer, KIND_CHUNKS, b"[" + b",".join(chunk_json(t) for t in "abcde") + b"]")
    single = add(state_client, key, sealer, KIND_CHUNK, chunk_json("f"))
    add(state_client, key, sealer, KIND_DONE, json.dumps({"finish_reason": "stop"}).encode())

    texts, positions = read(state_client, key, sealer)
    assert texts == list("abcdef")
    assert positions[:6] == [f"{batch}/1", f"{batch}/2", f"{batch}/3", f"{batch}/4", batch, single]

    assert read(state_client, key, sealer, start_id=f"{batch}/2")[0] == list("cdef")  # nothing lost, nothing twice
    assert read(state_client, key, sealer, start_id=batch)[0] == ["f"]
    assert read(state_client, key, sealer, start_id=single)[0] == []


def test_a_position_that_is_not_one_is_refused(state_client: redis.Redis, key: str, sealer: EntrySealer) -> None:
    with pytest.raises(FleetError) as caught:
        read(state_client, key, sealer, start_id="1-0/two")
    assert caught.value.code == "malformed"


def test_a_fast_writer_loses_nothing_and_needs_fewer_entries_than_chunks(
    state_client: redis.Redis, key: str, sealer: EntrySealer
) -> None:
    writer = StreamWriter(state_client, key, max_len=10_000, retention_s=60, cancel_key=key + ":cancel", sealer=sealer)
    words = [f"w{i} " for i in range(2000)]
    for word in words:
        assert writer.chunk(StreamChunk(content=word)) is False
    writer.done({"finish_reason": "stop"})
    assert read(state_client, key, sealer)[0] == words
    assert state_client.xlen(key) < len(words) + 1  # the relay grouped the chunks queued behind a round trip


@functools.cache
def signed_entry(encrypt: bool) -> tuple[EntrySealer, dict[bytes, bytes]]:
    """One stored chunk entry (and the sealer that reads it), made once."""
    ring = KeyRing.from_settings(generated_security(kid="t1", encryption_kid="e1"))
    sealer = EntrySealer(ring, "req-1", encrypt=encrypt)
    fields = sealer.fields(KIND_CHUNK, chunk_json("genuine"))
    return sealer, {name.encode(): value for name, value in fields.items()}


@pytest.mark.parametrize("encrypt", [True, False], ids=["sealed", "plain"])
@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_any_single_byte_change_to_a_stored_entry_is_refused(encrypt: bool, data: st.DataObject) -> None:
    """Kind, data, sequence number, key id or signature: one byte changed and no reader takes the entry."""
    sealer, stored = signed_entry(encrypt)
    assert sealer.authentic(stored) is not None
    name = data.draw(st.sampled_from(sorted(stored)))
    value = stored[name]
    position = data.draw(st.integers(min_value=0, max_value=len(value) - 1))
    byte = data.draw(st.integers(min_value=0, max_value=255).filter(lambda b: b != value[position]))
    changed = {**stored, name: value[:position] + bytes([byte]) + value[position + 1 :]}
    assert sealer.authentic(changed) is None


def test_a_reader_without_worker_keys_is_told_so_at_once(state_client: redis.Redis, key: str) -> None:
    """A producer configured without the workers' public keys: a typed configuration error, not a long wait."""
    from provider.settings import SecuritySettings

    writer_ring = KeyRing.from_settings(generated_security(kid="t1", encryption_kid="e1"))
    add(state_client, key, EntrySealer(writer_ring, "req-1"), KIND_DONE, b"{}")
    sealing = generated_security(kid="t1", encryption_kid="e1")
    reader_ring = KeyRing.from_settings(
        SecuritySettings(encryption_keys=sealing.encryption_keys, encryption_kid=sealing.encryption_kid)
    )
    with pytest.raises(FleetError) as caught:
        read(state_client, key, EntrySealer(reader_ring, "req-1"))
    assert caught.value.code == "key_configuration"
