"""The producer's side of a stream: one cursor (position, deadline) under the sync and the async readers."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator
from typing import Any

import redis

from provider.protocol import FleetError
from provider.protocol.errors import FleetTimeout, KeyConfiguration, StreamGap
from provider.vllm.models import StreamChunk
from tasks.metrics import FORGED_STREAM_ENTRIES
from tasks.stream_entries import EntrySealer, StreamReset, decode_entry, split_position

__all__ = [
    "CANCEL_TTL_S",
    "READ_BATCH",
    "FleetStream",
    "StreamCursor",
    "cancel_stream",
    "read_stream",
    "stream_deadline",
]

READ_BLOCK_MS = 1000
READ_BATCH = 512
# How long a cancel flag stays set: far longer than any request's deadline.
CANCEL_TTL_S = 3600.0
_STREAM_START = "0-0"
log = logging.getLogger("tasks.streams")


def cancel_stream(client: redis.Redis, cancel_key: str, ttl_s: float = CANCEL_TTL_S) -> None:
    """Raise the flag the worker's relay reads with each batch: it closes the HTTP stream at its next chunk."""
    client.set(cancel_key, b"1", px=int(ttl_s * 1000))


def stream_deadline(request_deadline: float | None, timeout_s: float | None, default_s: float) -> float:
    """When a reader gives up: ``timeout_s`` from now if the caller gives one, else the request's own deadline,
    else ``default_s`` from now. One rule for ``open_stream`` and ``astream``."""
    if timeout_s is not None:
        return time.time() + timeout_s
    if request_deadline is not None:
        return request_deadline
    return time.time() + default_s


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
    cursor = StreamCursor(start_id, deadline)
    entries: Any = client.xrange(key, *cursor.reread_range()) if cursor.reread else []
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
        entries = cursor.entries_of(client.xread(**cursor.next_read(key)))


class StreamCursor:
    """A reader's place in a stream: the last entry read and, inside an entry of several chunks, how many of
    them, the sequence number the next genuine entry must carry, and the deadline. Sync and async readers feed
    it what Redis returns for the reads it plans (``reread_range`` for XRANGE when ``reread``, then ``next_read``
    for each XREAD, its reply through ``entries_of``) and yield what ``items`` gives back: the loop's logic and the
    deadline are here, the readers only do the I/O (blocking or awaited)."""

    def __init__(self, position: str, deadline: float) -> None:
        self.deadline = deadline
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

    def reread_range(self) -> tuple[str, str]:
        """XRANGE bounds of the entry at the resume position (read again: part of it may be unread)."""
        return self.entry_id, self.entry_id

    def next_read(self, key: str) -> dict[str, Any]:
        """XREAD arguments for the next batch after the cursor, blocking at most until the deadline (raises
        ``fleet_timeout`` once it has passed)."""
        return {"streams": {key: self.entry_id}, "count": READ_BATCH, "block": self.block_ms()}

    @staticmethod
    def entries_of(reply: Any) -> list[tuple[Any, dict[bytes, bytes]]]:
        """The entries of an XREAD reply on one stream (none when it timed out)."""
        return list(reply[0][1]) if reply else []

    def block_ms(self) -> int:
        """How long the next XREAD may block; ``fleet_timeout`` once the deadline has passed."""
        remaining_ms = int((self.deadline - time.time()) * 1000)
        if remaining_ms <= 0:
            raise FleetTimeout("the stream did not finish before its deadline")
        return min(READ_BLOCK_MS, remaining_ms)

    def _refuse(self, entry_id: str, code: str) -> None:
        self.refused += 1
        FORGED_STREAM_ENTRIES.labels(code=code).inc()
        log.warning("skipping stream entry %s: %s", entry_id, code)


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
            if exc.code != "fleet_timeout":  # an error or cancelled entry ends the stream; a timeout does not
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

    def cancel(self, ttl_s: float = CANCEL_TTL_S) -> None:
        """Ask the worker to stop generating: it closes the HTTP stream at the first chunk after its relay sees the
        flag (two relay round trips and a token at most; the README gives the measured figures)."""
        cancel_stream(self._redis, self._cancel_key, ttl_s)
