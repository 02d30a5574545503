"""The streaming bridge: a worker relays chunks into a Redis Stream keyed by the task id; producers read it.

Each entry has a kind ``k`` and JSON data ``d``:

| k | meaning |
|---|---|
| ``c`` | a chunk (``provider.vllm.models.StreamChunk`` without its null fields) |
| ``b`` | several chunks in order, a JSON array of them (what the relay had queued for the stream at once) |
| ``r`` | reset: the worker restarted generation after a retryable failure; chunks before it are superseded |
| ``d`` | done: the assembled message follows in the task result; the stream ends |
| ``e`` | error: an error envelope; the stream ends |
| ``x`` | cancelled by the producer or a revoke; the stream ends |

When encryption is on, every entry's data is sealed (AES-256-GCM, bound to the request id), like results. Every
entry is also signed by the worker (Ed25519, its response key ``w``): the signature ``s`` covers the request id,
the kind, the entry's sequence number ``n`` (0, 1, 2, … in stream order) and the stored data. Readers skip (and
count) an entry that does not verify or repeats a sequence number already read, so a copied, re-kinded or
forged entry is never yielded and the genuine ones are read on; a genuine entry past a missing one (the stream
was truncated) ends the read with ``StreamGap``.
The stream is capped far above any response's chunk count and expires ``stream_retention_s`` after its end, so a
reader may start late or resume from any entry id within that time and miss nothing.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import redis
from cryptography.exceptions import InvalidSignature
from pydantic import TypeAdapter, ValidationError

from provider.protocol import PURPOSE_STREAM, EnvelopeError, FleetError, KeyRing, open_sealed, seal
from provider.protocol.codes import MALFORMED
from provider.protocol.errors import Cancelled, FleetTimeout, KeyConfiguration, RequestRefused, StreamGap
from provider.vllm.models import StreamChunk
from tasks.errors import fleet_error_from_envelope
from tasks.metrics import FORGED_STREAM_ENTRIES

__all__ = [
    "KIND_CANCELLED",
    "KIND_CHUNK",
    "KIND_CHUNKS",
    "KIND_DONE",
    "KIND_ERROR",
    "KIND_RESET",
    "EntrySealer",
    "FleetStream",
    "StreamCursor",
    "StreamReset",
    "StreamWriter",
    "decode_entry",
    "read_stream",
    "split_position",
]

KIND_CHUNK = b"c"
KIND_CHUNKS = b"b"
KIND_RESET = b"r"
KIND_DONE = b"d"
KIND_ERROR = b"e"
KIND_CANCELLED = b"x"
_TERMINAL = {KIND_DONE, KIND_ERROR, KIND_CANCELLED}
READ_BLOCK_MS = 1000
RELAY_BATCH = 512
FLUSH_TIMEOUT_S = 10.0
READ_BATCH = 512
_STREAM_START = "0-0"
_CHUNK_LIST = TypeAdapter(list[StreamChunk])
_ENTRY_SIGNATURE_PREFIX = b"llm.fleet.stream.entry.v2"
_MAX_SEQ_DIGITS = 12
log = logging.getLogger("tasks.streams")


@dataclass(frozen=True, slots=True)
class StreamReset:
    """Marker: generation restarted after a retryable failure; discard what was read before it.

    It reads like a chunk that carries nothing (``content``, ``reasoning``, ``finish_reason``, ``usage`` are
    None, ``tool_calls`` empty), so a loop that only prints ``chunk.content`` can ignore it safely; what came
    before it is then followed by the restarted text.
    """

    attempt: int
    entry_id: str = ""
    id: ClassVar[str | None] = None
    model: ClassVar[str | None] = None
    content: ClassVar[str | None] = None
    reasoning: ClassVar[str | None] = None
    tool_calls: ClassVar[tuple[()]] = ()
    finish_reason: ClassVar[str | None] = None
    stop_reason: ClassVar[str | None] = None
    usage: ClassVar[None] = None


class EntrySealer:
    """Seals (when encryption is on), numbers and signs one request's stream entries; checks them when read."""

    def __init__(self, keyring: KeyRing, request_id: str, *, encrypt: bool = True) -> None:
        self._keyring = keyring
        self._request_id = request_id
        self._encrypt = encrypt
        self._next_seq = 0
        self._lock = threading.Lock()

    def seal(self, data: bytes) -> bytes:
        """The stored form of an entry's data."""
        if not self._encrypt:
            return data
        box = seal(self._keyring, data, purpose=PURPOSE_STREAM, request_id=self._request_id, lane="")
        return json.dumps(box, separators=(",", ":")).encode()

    def open(self, stored: bytes) -> bytes:
        """An entry's data from its stored form."""
        if not self._encrypt:
            return stored
        box = json.loads(stored)
        return open_sealed(self._keyring, box, purpose=PURPOSE_STREAM, request_id=self._request_id, lane="")

    def _signing_input(self, kind: bytes, seq: int, stored: bytes) -> bytes:
        return b"%s\n%s\n%s\n%d\n%s" % (_ENTRY_SIGNATURE_PREFIX, self._request_id.encode(), kind, seq, stored)

    def fields(self, kind: bytes, plain: bytes) -> dict[str, bytes]:
        """The next entry of this stream as stored: kind, data (sealed), sequence number, worker kid, signature.

        Entries must be added to Redis in the order this numbers them (one writer per stream does that)."""
        stored = self.seal(plain)
        with self._lock:
            seq = self._next_seq
            self._next_seq += 1
        signature = self._keyring.response_signing_key().sign(self._signing_input(kind, seq, stored))
        return {
            "k": kind,
            "d": stored,
            "n": b"%d" % seq,
            "w": self._keyring.response_signing_kid.encode(),
            "s": signature,
        }

    @property
    def can_verify(self) -> bool:
        """Whether this side holds any worker's public key (else no entry can ever be read)."""
        return bool(self._keyring.response_verify_kids)

    def authentic(self, fields: dict[bytes, bytes]) -> tuple[bytes, int, bytes] | None:
        """(kind, sequence number, opened data) of an entry a fleet worker signed for this request; else None."""
        try:
            kind, stored, number, kid, signature = (fields[name] for name in (b"k", b"d", b"n", b"w", b"s"))
            if not number.isdigit() or len(number) > _MAX_SEQ_DIGITS:
                return None
            seq = int(number)
            public = self._keyring.response_verify_key(kid.decode("ascii"))
            if public is None:
                return None
            public.verify(signature, self._signing_input(kind, seq, stored))
            return kind, seq, self.open(stored)
        except (KeyError, ValueError, TypeError, InvalidSignature, EnvelopeError):
            return None


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


def read_stream(
    client: redis.Redis,
    key: str,
    *,
    deadline: float,
    sealer: EntrySealer,
    start_id: str = "0-0",
    on_entry: Any = None,
) -> Iterator[StreamChunk | StreamReset]:
    """Yield chunks (and reset markers) after the position ``start_id`` until the terminal entry or the deadline.

    Raises ``FleetError`` for an error entry, a cancelled stream, or a deadline reached with no end.
    ``on_entry`` (if given) is called with the position of each item before it is yielded, so a caller can
    remember where to resume: an entry id, or ``<entry id>/<n>`` inside an entry of several chunks.
    """
    cursor = StreamCursor(start_id)
    entries: Any = client.xrange(key, min=cursor.entry_id, max=cursor.entry_id) if cursor.reread else []
    while True:
        try:
            for position, item in cursor.items(entries, sealer):
                if on_entry is not None:
                    on_entry(position)
                yield item
        except FleetError:  # an error or cancelled entry: the position is at it, as at the successful end
            if on_entry is not None:
                on_entry(cursor.entry_id)
            raise
        if cursor.ended:
            if on_entry is not None:
                on_entry(cursor.entry_id)
            return
        remaining_ms = int((deadline - time.time()) * 1000)
        if remaining_ms <= 0:
            raise FleetTimeout("the stream did not finish before its deadline")
        reply: Any = client.xread({key: cursor.entry_id}, count=READ_BATCH, block=min(READ_BLOCK_MS, remaining_ms))
        entries = reply[0][1] if reply else []


class StreamCursor:
    """A reader's place in a stream: the last entry read and, inside an entry of several chunks, how many of
    them, and the sequence number the next genuine entry must carry. Sync and async readers feed it the entries
    XRANGE/XREAD return (from a position other than the start, beginning with the entry at that position:
    ``reread``) and yield what it gives back."""

    def __init__(self, position: str) -> None:
        self.entry_id, self.skip = split_position(position)
        self._position_id = self.entry_id
        self.reread = self.entry_id != _STREAM_START
        self._whole = self.reread and self.skip == 0  # a bare entry id: that entry was read completely
        self.next_seq: int | None = None if self.reread else 0
        self.ended = False
        self.refused = 0

    def items(
        self, entries: Iterable[tuple[Any, dict[bytes, bytes]]], sealer: EntrySealer
    ) -> Iterator[tuple[str, StreamChunk | StreamReset]]:
        """Each item of ``entries`` past the cursor with the position just after it; stops at the stream's end
        (``ended``), and raises ``FleetError`` at a failed one, after the items before it. Entries no worker
        signed for this request, or that repeat one already read, are skipped and counted (``refused``)."""
        if not sealer.can_verify:
            raise KeyConfiguration("no worker response keys are configured here (response_verify_keys)")
        for raw_id, fields in entries:
            entry_id = raw_id.decode() if isinstance(raw_id, bytes) else str(raw_id)
            self.entry_id = entry_id
            checked = sealer.authentic(fields)
            if checked is None:
                self._refuse(entry_id, "response_forged")
                continue
            kind, seq, data = checked
            if self.next_seq is None:  # the first genuine entry read after a resume: where the stream stands
                self.next_seq = seq
            if seq < self.next_seq:
                self._refuse(entry_id, "stream_duplicate")
                continue
            if seq > self.next_seq:
                raise StreamGap(f"the stream lost {seq - self.next_seq} entries before {entry_id}")
            self.next_seq = seq + 1
            items = decode_entry(kind, data, entry_id)
            at_position = entry_id == self._position_id  # what of the entry at the resume position was read
            whole, skip = at_position and self._whole, self.skip if at_position else 0
            self._whole, self.skip = False, 0
            if items is None:
                self.ended = True
                return
            if whole:
                continue
            total = len(items)
            for index, item in enumerate(items[skip:], start=skip + 1):
                yield (entry_id if index == total else f"{entry_id}/{index}"), item

    def _refuse(self, entry_id: str, code: str) -> None:
        self.refused += 1
        FORGED_STREAM_ENTRIES.labels(code=code).inc()
        log.warning("skipping stream entry %s: %s", entry_id, code)


def split_position(position: str) -> tuple[str, int]:
    """``"<entry id>/<n>"`` → (entry id, chunks of it already read); a bare entry id → (it, 0)."""
    entry_id, _, consumed = position.partition("/")
    if consumed and not consumed.isdigit():
        raise RequestRefused(f"not a stream position: {position!r}", code=MALFORMED)
    return entry_id, int(consumed or 0)


def decode_entry(kind: bytes, data: bytes, entry_id: str) -> Sequence[StreamChunk | StreamReset] | None:
    """What one authentic stream entry yields to a reader; None at the successful end; ``FleetError`` for a
    failed one (and ``malformed`` for data a worker would not have written)."""
    try:
        if kind == KIND_CHUNK:
            return [StreamChunk.model_validate_json(data)]
        if kind == KIND_CHUNKS:
            return _CHUNK_LIST.validate_json(data)
        if kind == KIND_RESET:
            return [StreamReset(attempt=int(json.loads(data)["attempt"]), entry_id=entry_id)]
        if kind == KIND_DONE:
            return None
        if kind == KIND_ERROR:
            raise fleet_error_from_envelope(json.loads(data))
        if kind == KIND_CANCELLED:
            raise Cancelled(str(json.loads(data).get("reason", "cancelled")))
    except (ValueError, TypeError, KeyError, AttributeError, ValidationError):
        raise RequestRefused("the stream holds an entry that cannot be read", code=MALFORMED) from None
    raise RequestRefused("the stream holds an entry of an unknown kind", code=MALFORMED)


class FleetStream:
    """A producer's view of one streamed chat: iterate chunks while the task runs, resume, or cancel.

    Iteration yields ``StreamChunk`` objects and, if the worker had to restart generation, a ``StreamReset``
    marker (discard what came before it). ``last_id`` is the position to resume from with ``start_id``.
    """

    def __init__(
        self,
        task_id: str,
        *,
        client: redis.Redis,
        key: str,
        cancel_key: str,
        deadline: float,
        sealer: EntrySealer,
        start_id: str = "0-0",
    ) -> None:
        self.task_id = task_id
        self._sealer = sealer
        self.last_id = start_id
        self._redis = client
        self._key = key
        self._cancel_key = cancel_key
        self._deadline = deadline
        # What this reader has seen (content since the last reset) and how the stream ended, so that text() after
        # an iteration, or a second iteration, answers at once instead of waiting past the end for the deadline.
        self._parts: list[str] = []
        self._ended = False
        self._failure: FleetError | None = None

    def __iter__(self) -> Iterator[StreamChunk | StreamReset]:
        return self._read()

    def _read(self) -> Iterator[StreamChunk | StreamReset]:
        """Items after ``last_id``; nothing more (or the same error again) once the stream has ended."""
        if self._ended:
            if self._failure is not None:
                raise self._failure
            return
        items = read_stream(
            self._redis,
            self._key,
            deadline=self._deadline,
            sealer=self._sealer,
            start_id=self.last_id,
            on_entry=self._remember,
        )
        try:
            for item in items:
                if isinstance(item, StreamReset):
                    self._parts.clear()
                elif item.content:
                    self._parts.append(item.content)
                yield item
        except FleetError as exc:
            if not isinstance(exc, FleetTimeout):  # an error or cancelled entry ends the stream; a timeout does not
                self._ended, self._failure = True, exc
            raise
        self._ended = True

    def _remember(self, entry_id: str) -> None:
        self.last_id = entry_id

    def text(self) -> str:
        """Read to the end and return the visible content (a reset discards what came before it), including
        what an earlier iteration of this reader already read; at once when that iteration reached the end."""
        for _ in self:
            pass
        return "".join(self._parts)

    def cancel(self, ttl_s: float = 3600.0) -> None:
        """Ask the worker to stop generating: it closes the HTTP stream at the first chunk after its relay sees the
        flag (two relay round trips and a token at most; the README gives the measured figures)."""
        self._redis.set(self._cancel_key, b"1", px=int(ttl_s * 1000))
