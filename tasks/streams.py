"""The streaming bridge: a worker relays chunks into a Redis Stream keyed by the task id; producers read it.

The entry format is in ``tasks.stream_entries``, the worker's side in ``tasks.stream_writer`` and the producer's
in ``tasks.stream_reader``; this module re-exports their public names.

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
was truncated) ends the read with ``FleetError(code="stream_gap")``.
The stream is capped far above any response's chunk count and expires ``stream_retention_s`` after its end, so a
reader may start late or resume from any entry id within that time and miss nothing.
"""

from tasks.stream_entries import (
    KIND_CANCELLED,
    KIND_CHUNK,
    KIND_CHUNKS,
    KIND_DONE,
    KIND_ERROR,
    KIND_RESET,
    EntrySealer,
    StreamReset,
    decode_entry,
    split_position,
)
from tasks.stream_reader import READ_BATCH, FleetStream, StreamCursor, read_stream, stream_deadline
from tasks.stream_writer import ChunkRelay, StreamWriter, relay_for

__all__ = [
    "KIND_CANCELLED",
    "KIND_CHUNK",
    "KIND_CHUNKS",
    "KIND_DONE",
    "KIND_ERROR",
    "KIND_RESET",
    "READ_BATCH",
    "ChunkRelay",
    "EntrySealer",
    "FleetStream",
    "StreamCursor",
    "StreamReset",
    "StreamWriter",
    "decode_entry",
    "read_stream",
    "relay_for",
    "split_position",
    "stream_deadline",
]
