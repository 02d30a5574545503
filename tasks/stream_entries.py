"""The stream entry format both sides agree on: kinds, the reset marker, the sealer that signs and checks entries.

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
the kind, the entry's sequence number ``n`` (0, 1, 2, … in stream order, continued by a re-run of the request
after the entries already written: ``StreamWriter.resume``) and the stored data. Readers skip (and
count) an entry that does not verify or repeats a sequence number already read, so a copied, re-kinded or
forged entry is never yielded and the genuine ones are read on; a genuine entry past a missing one (the stream
was truncated) ends the read with ``FleetError(code="stream_gap")``.
The stream is capped far above any response's chunk count and expires ``stream_retention_s`` after its end, so a
reader may start late or resume from any entry id within that time and miss nothing.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

from cryptography.exceptions import InvalidSignature
from pydantic import TypeAdapter, ValidationError

from provider.protocol import PURPOSE_STREAM, EnvelopeError, KeyRing, open_sealed, seal
from provider.protocol.codes import MALFORMED
from provider.protocol.errors import Cancelled, RequestRefused
from provider.vllm.models import StreamChunk
from tasks.errors import fleet_error_from_envelope

__all__ = [
    "KIND_CANCELLED",
    "KIND_CHUNK",
    "KIND_CHUNKS",
    "KIND_DONE",
    "KIND_ERROR",
    "KIND_RESET",
    "EntrySealer",
    "StreamReset",
    "decode_entry",
    "split_position",
]

KIND_CHUNK = b"c"
KIND_CHUNKS = b"b"
KIND_RESET = b"r"
KIND_DONE = b"d"
KIND_ERROR = b"e"
KIND_CANCELLED = b"x"
_CHUNK_LIST = TypeAdapter(list[StreamChunk])
_ENTRY_SIGNATURE_PREFIX = b"llm.fleet.stream.entry.v2"
_MAX_SEQ_DIGITS = 12


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

    def continue_after(self, seq: int) -> None:
        """Number the next entry ``seq + 1``: a writer re-created for a stream that already holds entries (the
        request re-run after its worker died, or handed back) continues the sequence its readers follow."""
        with self._lock:
            self._next_seq = max(self._next_seq, seq + 1)

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
