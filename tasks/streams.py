"""The streaming bridge: a worker relays chunks into a Redis Stream keyed by the task id; producers read it.

The entry format is in ``tasks.stream_entries``, the worker's side in ``tasks.stream_writer`` and the producer's
in ``tasks.stream_reader``; this module re-exports their public names.

The entry kinds, their signatures and sealing, and what readers refuse, are described once, in
``tasks.stream_entries``.
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
