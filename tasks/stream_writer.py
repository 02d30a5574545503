"""The worker's side of a stream: the relay thread that appends chunks to Redis, and each task's writer."""

from __future__ import annotations

import json
import queue
import threading
from typing import Any

import redis

from provider.vllm.models import StreamChunk
from tasks.stream_entries import KIND_CANCELLED, KIND_CHUNK, KIND_CHUNKS, KIND_DONE, KIND_ERROR, KIND_RESET, EntrySealer

__all__ = ["ChunkRelay", "StreamWriter", "relay_for"]

RELAY_BATCH = 512
FLUSH_TIMEOUT_S = 10.0
RESUME_SCAN = 16  # the last entries a re-created writer looks at for the sequence number to continue after


class _StreamState:
    """One writer's stream as the relay thread sees it: how to seal its entries, and what it reports back."""

    __slots__ = ("cancelled", "error", "flushed", "pending", "sealer")

    def __init__(self, sealer: EntrySealer) -> None:
        self.sealer = sealer
        self.pending = 0
        self.cancelled = False
        self.error: Exception | None = None
        self.flushed = threading.Condition()


class ChunkRelay:
    """One thread per worker that appends every stream's chunks to Redis, many per round trip.

    A chunk that finds the relay idle goes out at once (no added latency); chunks that arrive while a round trip
    is in flight go out together in the next one (group commit). The chunks a batch holds for one stream become
    one entry, sealed once (``b``: a JSON array of them), so a fast stream costs one seal, one entry and one
    read per batch rather than per token. Each batch also reads the cancel flags of its streams.
    """

    def __init__(self, client: redis.Redis) -> None:
        self._redis = client
        self._queue: queue.SimpleQueue[tuple[str, bytes, int, str, _StreamState]] = queue.SimpleQueue()
        threading.Thread(target=self._run, name="stream-relay", daemon=True).start()

    def submit(self, key: str, data: bytes, max_len: int, cancel_key: str, state: _StreamState) -> None:
        """Queue one chunk of a stream."""
        with state.flushed:
            state.pending += 1
        self._queue.put((key, data, max_len, cancel_key, state))

    def _run(self) -> None:
        while True:
            batch = [self._queue.get()]
            while len(batch) < RELAY_BATCH:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            self._write(batch)

    def _write(self, batch: list[tuple[str, bytes, int, str, _StreamState]]) -> None:
        grouped: dict[str, tuple[int, _StreamState, list[bytes]]] = {}
        for key, data, max_len, _, state in batch:
            grouped.setdefault(key, (max_len, state, []))[2].append(data)
        streams: dict[str, _StreamState] = {cancel_key: state for _, _, _, cancel_key, state in batch}
        pipe = self._redis.pipeline(transaction=False)
        error: Exception | None = None
        try:
            for key, (max_len, state, chunks) in grouped.items():
                kind, plain = (
                    (KIND_CHUNK, chunks[0]) if len(chunks) == 1 else (KIND_CHUNKS, b"[%s]" % b",".join(chunks))
                )
                fields: Any = state.sealer.fields(kind, plain)
                pipe.xadd(key, fields, maxlen=max_len, approximate=True)
            for cancel_key in streams:
                pipe.exists(cancel_key)
            replies = pipe.execute()
        except Exception as exc:  # reported to the writers, whose tasks fail with it; the relay lives on
            error, replies = exc, []
        flags = replies[len(grouped) :]
        for state, flag in zip(streams.values(), flags or [0] * len(streams), strict=True):
            state.cancelled = state.cancelled or bool(flag)
        for *_, state in batch:
            with state.flushed:
                state.error = state.error or error
                state.pending -= 1
                if state.pending == 0:
                    state.flushed.notify_all()


_relays: dict[int, ChunkRelay] = {}
_relays_lock = threading.Lock()


def relay_for(client: redis.Redis) -> ChunkRelay:
    """The relay of this Redis client (one per worker process)."""
    with _relays_lock:
        relay = _relays.get(id(client))
        if relay is None:
            relay = _relays[id(client)] = ChunkRelay(client)
        return relay


class StreamWriter:
    """Appends one task's chunks (through the worker's relay) and its terminal entry to its Redis Stream."""

    def __init__(
        self,
        client: redis.Redis,
        key: str,
        *,
        max_len: int,
        retention_s: float,
        cancel_key: str,
        sealer: EntrySealer,
    ) -> None:
        self._redis = client
        self._relay = relay_for(client)
        self._state = _StreamState(sealer)
        self._sealer = sealer
        self._key = key
        self._cancel_key = cancel_key
        self._max_len = max_len
        self._retention_ms = int(retention_s * 1000)

    def resume(self) -> bool:
        """Continue the numbering of a stream that already holds entries (a re-run after the worker that wrote
        them died, or a hand-back): the next entry follows the last one written, so readers see the reset and
        the new run's chunks in sequence (no ``stream_gap``, nothing skipped as a repeat). Returns whether the
        stream held entries (the new run must then start with a reset)."""
        entries: Any = self._redis.xrevrange(self._key, count=RESUME_SCAN)
        if not entries:
            return False
        numbers = [seq for _, fields in entries if (seq := self._written_seq(fields)) is not None]
        if numbers:
            self._sealer.continue_after(max(numbers))
        return True

    def _written_seq(self, fields: dict[bytes, bytes]) -> int | None:
        """An entry's sequence number, if a fleet worker signed it (when this side can check signatures)."""
        if self._sealer.can_verify:
            checked = self._sealer.authentic(fields)
            return None if checked is None else checked[1]
        number = fields.get(b"n", b"")
        return int(number) if number.isdigit() and len(number) <= 12 else None

    def chunk(self, chunk: StreamChunk) -> bool:
        """Relay one chunk as it arrives; returns whether the producer has asked to cancel (seen by the relay)."""
        if self._state.error is not None:
            raise self._state.error
        data = chunk.model_dump_json(exclude_none=True, exclude_defaults=True).encode()  # sealed by the relay
        self._relay.submit(self._key, data, self._max_len, self._cancel_key, self._state)
        return self._state.cancelled

    def flush(self, timeout_s: float = FLUSH_TIMEOUT_S) -> None:
        """Wait until every chunk handed to the relay is in Redis (entries after it keep their order)."""
        with self._state.flushed:
            self._state.flushed.wait_for(lambda: self._state.pending == 0, timeout=timeout_s)

    def reset(self, attempt: int) -> None:
        """Mark a restart of generation (retry after a dropped stream)."""
        self._append(KIND_RESET, {"attempt": attempt}, terminal=False)

    def done(self, summary: dict[str, Any]) -> None:
        """End the stream successfully."""
        self._append(KIND_DONE, summary, terminal=True)

    def error(self, error_envelope: dict[str, Any]) -> None:
        """End the stream with a typed error."""
        self._append(KIND_ERROR, error_envelope, terminal=True)

    def cancelled(self, reason: str) -> None:
        """End the stream because the producer gave up."""
        self._append(KIND_CANCELLED, {"reason": reason}, terminal=True)

    def _append(self, kind: bytes, data: dict[str, Any], *, terminal: bool) -> None:
        self.flush()
        pipe = self._redis.pipeline(transaction=False)
        fields: Any = self._sealer.fields(kind, json.dumps(data).encode())
        pipe.xadd(self._key, fields, maxlen=self._max_len, approximate=True)
        if terminal:
            pipe.pexpire(self._key, self._retention_ms)
        pipe.execute()
