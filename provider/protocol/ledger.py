"""The replay/lease ledger for ``jti`` and the idempotency store, in Redis, each update one Lua script.

Keys (all under one prefix given by the caller):

``{prefix}:jti:{jti}``
    A hash: ``digest`` (SHA-256 naming the exact message that first claimed the jti), ``state`` (``held``,
    ``released`` or ``done``), ``holder`` (who runs it), ``lease_until`` (Redis server time, ms), ``result``
    (JSON, once done). Expires after the replay memory, or the result TTL once done, whichever is later.
``{prefix}:idem:{sha256}``
    A hash: ``params_hash``, ``request_id`` (the first request with this key). The name is the SHA-256 of
    the canonical JSON ``[scope, idempotency_key]``, scope being ``<caller hash>:<operation>``. Expires after
    its TTL.

``{prefix}:alive:{holder}``
    A holder's heartbeat: present while the worker process that holds leases is alive (it renews it every
    second or so, with a short expiry). The worker writes it on a connection of its own, named after the holder
    (``CLIENT SETNAME``, ``holder_client_name``). A redelivered request takes a held lease over at once instead
    of waiting out the lease (``take_over_if_dead``) only when the holder looks dead both ways: no heartbeat key
    AND no client of that name in ``CLIENT LIST``. A live worker too starved to renew its key in time still
    holds its connection (the kernel closes a killed process's sockets at once), so it keeps its lease.

Lease times come from the Redis server clock, so workers with skewed clocks agree on who holds a jti.
A claim of a jti answers: ``COMPLETED`` (the same message finished: answer with the stored result), ``HELD``
(a live holder runs it: do not run it again), ``TAKEN`` (free, handed back, or its holder's lease ran out: the
caller now holds it), ``MISMATCH`` (another message reuses the jti: refuse it as replayed). Only the current
holder completes, renews or releases; a stored result is never overwritten.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import redis

from provider.protocol.canonical import sha256_hex
from provider.protocol.errors import IdempotencyConflictError, ReplayedError

__all__ = [
    "COMPLETE_RECORD_LUA",
    "DEFAULT_LEASE_S",
    "DEFAULT_POLL_S",
    "DEFAULT_REPLAY_MEMORY_S",
    "ClaimOutcome",
    "ClaimStatus",
    "IdemOutcome",
    "IdemStatus",
    "IdempotencyStore",
    "JtiLedger",
    "holder_client_name",
    "idempotency_record_key",
    "jti_record_key",
]

DEFAULT_LEASE_S = 30.0
DEFAULT_REPLAY_MEMORY_S = 600.0
DEFAULT_POLL_S = 0.05
_MS_PER_S = 1000

# Server time in ms, as every script below computes it.
_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

_KEEP_AT_LEAST = """
local function keep_at_least(key, ms)
  local ttl = redis.call('PTTL', key)
  if ttl < ms then redis.call('PEXPIRE', key, ms) end
end
"""

# KEYS[1] record; ARGV digest, holder, lease_ms, memory_ms
_CLAIM_LUA = (
    _NOW
    + _KEEP_AT_LEAST
    + """
local rec = redis.call('HMGET', KEYS[1], 'digest', 'state', 'holder', 'lease_until', 'result')
local lease_ms = tonumber(ARGV[3])
if not rec[1] then
  redis.call('HSET', KEYS[1], 'digest', ARGV[1], 'state', 'held', 'holder', ARGV[2],
             'lease_until', now + lease_ms)
  redis.call('PEXPIRE', KEYS[1], math.max(tonumber(ARGV[4]), lease_ms))
  return {'TAKEN', ARGV[2], tostring(lease_ms)}
end
if rec[1] ~= ARGV[1] then return {'MISMATCH'} end
if rec[2] == 'done' then return {'COMPLETED', rec[5] or 'null'} end
local lease_until = tonumber(rec[4]) or 0
if rec[2] == 'held' and lease_until > now then
  return {'HELD', rec[3] or '', tostring(lease_until - now)}
end
redis.call('HSET', KEYS[1], 'state', 'held', 'holder', ARGV[2], 'lease_until', now + lease_ms)
keep_at_least(KEYS[1], math.max(tonumber(ARGV[4]), lease_ms))
return {'TAKEN', ARGV[2], tostring(lease_ms)}
"""
)

# KEYS[1] record; ARGV holder, lease_ms
_RENEW_LUA = (
    _NOW
    + _KEEP_AT_LEAST
    + """
local rec = redis.call('HMGET', KEYS[1], 'state', 'holder')
if rec[1] ~= 'held' or rec[2] ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'lease_until', now + tonumber(ARGV[2]))
keep_at_least(KEYS[1], tonumber(ARGV[2]))
return 1
"""
)

# A Lua function other scripts can call (``complete_record``): store the result unless another holder has the jti.
COMPLETE_RECORD_LUA = (
    _KEEP_AT_LEAST
    + """
local function complete_record(key, holder, result, ttl_ms)
  local rec = redis.call('HMGET', key, 'state', 'holder')
  if rec[1] ~= 'held' or rec[2] ~= holder then return 0 end
  redis.call('HSET', key, 'state', 'done', 'result', result, 'lease_until', 0)
  keep_at_least(key, tonumber(ttl_ms))
  return 1
end
"""
)

# KEYS[1] record; ARGV holder, result_json, ttl_ms
_COMPLETE_LUA = COMPLETE_RECORD_LUA + "return complete_record(KEYS[1], ARGV[1], ARGV[2], ARGV[3])\n"

# KEYS[1] record
_LOOKUP_LUA = (
    _NOW
    + """
local rec = redis.call('HMGET', KEYS[1], 'state', 'holder', 'lease_until', 'result')
if rec[1] == 'done' then return {'COMPLETED', rec[4] or 'null'} end
local lease_until = tonumber(rec[3]) or 0
if rec[1] == 'held' and lease_until > now then
  return {'HELD', rec[2] or '', tostring(lease_until - now)}
end
return {'FREE'}
"""
)

# KEYS[1] record, KEYS[2] the current holder's heartbeat key; ARGV current holder, new holder, lease_ms
_TAKE_OVER_LUA = (
    _NOW
    + """
local rec = redis.call('HMGET', KEYS[1], 'state', 'holder')
if rec[1] ~= 'held' or rec[2] ~= ARGV[1] then return 0 end
if redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'holder', ARGV[2], 'lease_until', now + tonumber(ARGV[3]))
return 1
"""
)

# KEYS[1] record; ARGV error code. Forget a completed record whose stored result is an error with that code.
_FORGET_ERROR_LUA = """
local rec = redis.call('HMGET', KEYS[1], 'state', 'result')
if rec[1] ~= 'done' or not rec[2] then return 0 end
local ok, result = pcall(cjson.decode, rec[2])
if ok and type(result) == 'table' and result['code'] == ARGV[1] then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
"""

# KEYS[1] record; ARGV holder
_RELEASE_LUA = """
local rec = redis.call('HMGET', KEYS[1], 'state', 'holder')
if rec[1] ~= 'held' or rec[2] ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'state', 'released', 'holder', '', 'lease_until', 0)
return 1
"""

# KEYS[1] record; ARGV params_hash, request_id, ttl_ms
_RESERVE_LUA = """
local rec = redis.call('HMGET', KEYS[1], 'params_hash', 'request_id')
if not rec[1] then
  redis.call('HSET', KEYS[1], 'params_hash', ARGV[1], 'request_id', ARGV[2])
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
  return {'NEW', ARGV[2]}
end
if rec[1] ~= ARGV[1] then return {'CONFLICT', rec[2]} end
if rec[2] == ARGV[2] then return {'SAME_REQUEST', rec[2]} end
return {'DUPLICATE', rec[2]}
"""

# KEYS[1] record; ARGV request_id
_FORGET_LUA = """
if redis.call('HGET', KEYS[1], 'request_id') ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
return 1
"""


def jti_record_key(prefix: str, jti: str) -> str:
    """The Redis key of a jti's record."""
    return f"{prefix}:jti:{jti}"


def idempotency_record_key(prefix: str, scope: str, key: str) -> str:
    """The Redis key of an idempotency record: SHA-256 of ``[scope, key]`` (keys are caller text)."""
    return f"{prefix}:idem:{sha256_hex([scope, key])}"


def holder_client_name(holder: str) -> str:
    """The Redis client name (``CLIENT SETNAME``) of a holder's heartbeat connection: the holder with anything
    outside printable ASCII or a space replaced (Redis refuses those in a name)."""
    return re.sub(r"[^!-~]", "_", holder) or "_"


def _text(value: object) -> str:
    """A Redis reply as text (clients may or may not decode responses)."""
    if isinstance(value, bytes):
        return value.decode("utf-8")
    return str(value)


def _ms(seconds: float) -> int:
    """Whole milliseconds, at least 1 (Redis refuses a zero expiry)."""
    return max(1, round(seconds * _MS_PER_S))


class ClaimStatus(StrEnum):
    """What a claim of a jti found."""

    COMPLETED = "COMPLETED"
    HELD = "HELD"
    TAKEN = "TAKEN"
    MISMATCH = "MISMATCH"


@dataclass(frozen=True, slots=True)
class ClaimOutcome:
    """A claim's answer: status, stored result (COMPLETED), holder and lease left (HELD, TAKEN)."""

    status: ClaimStatus
    result: Any = None
    holder: str | None = None
    lease_left_s: float | None = None

    def raise_if_replayed(self) -> None:
        """ReplayedError for MISMATCH: another message reuses this jti."""
        if self.status is ClaimStatus.MISMATCH:
            raise ReplayedError(field="jti")


class IdemStatus(StrEnum):
    """What reserving an idempotency key found."""

    NEW = "NEW"
    SAME_REQUEST = "SAME_REQUEST"
    DUPLICATE = "DUPLICATE"
    CONFLICT = "CONFLICT"


@dataclass(frozen=True, slots=True)
class IdemOutcome:
    """A reservation's answer, with the request id that first used the key."""

    status: IdemStatus
    request_id: str

    def raise_for_conflict(self) -> None:
        """IdempotencyConflictError for CONFLICT: the key was used with different params."""
        if self.status is IdemStatus.CONFLICT:
            raise IdempotencyConflictError(field="idempotency_key")


class JtiLedger:
    """Leases and stored results by jti: a redelivery resumes or answers, a replay never runs."""

    def __init__(
        self,
        client: redis.Redis,
        prefix: str,
        lease_s: float = DEFAULT_LEASE_S,
        memory_s: float = DEFAULT_REPLAY_MEMORY_S,
    ) -> None:
        self._redis = client
        self._prefix = prefix
        self._lease_ms = _ms(lease_s)
        self._memory_ms = _ms(memory_s)
        self._claim = client.register_script(_CLAIM_LUA)
        self._renew = client.register_script(_RENEW_LUA)
        self._complete = client.register_script(_COMPLETE_LUA)
        self._release = client.register_script(_RELEASE_LUA)
        self._lookup = client.register_script(_LOOKUP_LUA)
        self._take_over = client.register_script(_TAKE_OVER_LUA)
        self._forget_error = client.register_script(_FORGET_ERROR_LUA)

    def key(self, jti: str) -> str:
        """The Redis key of a jti's record."""
        return jti_record_key(self._prefix, jti)

    def claim(self, jti: str, token_digest: str, holder: str, *, memory_s: float | None = None) -> ClaimOutcome:
        """Take the lease, or learn who has it or what it produced (one atomic script).

        ``memory_s`` (default: the ledger's) should outlive the token (time left + leeway): a replay arriving
        after the record expired is then refused by the deadline check instead.
        """
        memory_ms = self._memory_ms if memory_s is None else _ms(memory_s)
        reply = self._claim(keys=[self.key(jti)], args=[token_digest, holder, self._lease_ms, memory_ms])
        status = ClaimStatus(_text(reply[0]))
        if status is ClaimStatus.COMPLETED:
            return ClaimOutcome(status, result=json.loads(_text(reply[1])))
        if status in (ClaimStatus.HELD, ClaimStatus.TAKEN):
            return ClaimOutcome(status, holder=_text(reply[1]), lease_left_s=int(_text(reply[2])) / _MS_PER_S)
        return ClaimOutcome(status)

    def renew(self, jti: str, holder: str) -> bool:
        """Extend the lease; False when this holder no longer holds it."""
        return bool(self._renew(keys=[self.key(jti)], args=[holder, self._lease_ms]))

    def renew_many(self, jtis: Iterable[str], holder: str, client: redis.Redis | None = None) -> list[bool]:
        """Extend every lease this holder holds among ``jtis`` in one round trip (a pipeline of the renew
        script): True for each renewed, False for each no longer held. ``client``: the connection to send it
        on (a worker's own heartbeat connection), by default the ledger's."""
        names = list(jtis)
        if not names:
            return []
        pipe = (client or self._redis).pipeline(transaction=False)
        for jti in names:
            self._renew(keys=[self.key(jti)], args=[holder, self._lease_ms], client=pipe)
        return [bool(reply) for reply in pipe.execute()]

    @property
    def client(self) -> redis.Redis:
        """The Redis client the ledger's scripts run on."""
        return self._redis

    def completion(self, jti: str, holder: str, result: Any, ttl_s: float) -> tuple[str, list[str | int]]:
        """The key and arguments of ``complete`` (``COMPLETE_RECORD_LUA``'s ``complete_record(key, *args)``),
        for a script that completes the record and writes elsewhere in the same round trip."""
        payload = json.dumps(result, separators=(",", ":"), ensure_ascii=False)
        return self.key(jti), [holder, payload, _ms(ttl_s)]

    def complete(self, jti: str, holder: str, result: Any, ttl_s: float) -> bool:
        """Store the result (kept at least ``ttl_s``); False, nothing written, unless this holder holds it."""
        key, args = self.completion(jti, holder, result, ttl_s)
        return bool(self._complete(keys=[key], args=args))

    def alive_key(self, holder: str) -> str:
        """The Redis key of a holder's heartbeat."""
        return f"{self._prefix}:alive:{holder}"

    def heartbeat(self, holder: str, ttl_s: float, client: redis.Redis | None = None) -> None:
        """Say this holder is alive for ``ttl_s`` more seconds (on ``client``: the holder's named connection)."""
        (client or self._redis).set(self.alive_key(holder), "1", px=_ms(ttl_s))

    def holder_alive(self, holder: str) -> bool:
        """Whether a holder's heartbeat is current."""
        return bool(self._redis.exists(self.alive_key(holder)))

    def holder_connected(self, holder: str) -> bool:
        """Whether a client named after this holder (its heartbeat connection) is connected to Redis now.

        False when the server refuses ``CLIENT LIST`` (an ACL without it): the heartbeat key alone decides then.
        """
        name = holder_client_name(holder)
        try:
            clients = self._redis.client_list()
        except redis.ResponseError:
            return False
        return any(client.get("name") == name for client in clients)

    def take_over_if_dead(self, jti: str, current_holder: str, holder: str) -> bool:
        """Take a held lease whose holder is dead: no heartbeat key and no connection named after it.

        False when the holder is alive (either sign of life keeps its lease: a slow worker is not a dead one)
        or the lease moved on. ``CLIENT LIST`` is only asked once the heartbeat key is missing.
        """
        if self.holder_alive(current_holder) or self.holder_connected(current_holder):
            return False
        reply = self._take_over(
            keys=[self.key(jti), self.alive_key(current_holder)], args=[current_holder, holder, self._lease_ms]
        )
        return bool(reply)

    def forget_error(self, jti: str, code: str) -> bool:
        """Forget a jti whose stored result is the error ``code`` (a dead letter being requeued runs again)."""
        return bool(self._forget_error(keys=[self.key(jti)], args=[code]))

    def release(self, jti: str, holder: str) -> bool:
        """Hand the jti back (drop the lease) for a redelivery to take; False unless this holder holds it."""
        return bool(self._release(keys=[self.key(jti)], args=[holder]))

    def lookup(self, jti: str) -> ClaimOutcome | None:
        """COMPLETED (with the result) or HELD by a live holder, without claiming; None when neither."""
        reply = self._lookup(keys=[self.key(jti)])
        status = _text(reply[0])
        if status == ClaimStatus.COMPLETED:
            return ClaimOutcome(ClaimStatus.COMPLETED, result=json.loads(_text(reply[1])))
        if status == ClaimStatus.HELD:
            return ClaimOutcome(ClaimStatus.HELD, holder=_text(reply[1]), lease_left_s=int(_text(reply[2])) / _MS_PER_S)
        return None

    def wait_for_result(self, jti: str, *, timeout_s: float, poll_s: float = DEFAULT_POLL_S) -> ClaimOutcome | None:
        """The COMPLETED outcome once the jti has a result (a duplicate waits on it); None at timeout."""
        deadline = time.monotonic() + timeout_s
        while True:
            outcome = self.lookup(jti)
            if outcome is not None and outcome.status is ClaimStatus.COMPLETED:
                return outcome
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            time.sleep(min(poll_s, left))

    def peek(self, jti: str) -> dict[str, str] | None:
        """The record as stored (for operators and tests), or None."""
        raw: Any = self._redis.hgetall(self.key(jti))
        if not raw:
            return None
        return {_text(name): _text(value) for name, value in raw.items()}


class IdempotencyStore:
    """Idempotency keys scoped to (caller hash, operation): the first request id and its params hash."""

    def __init__(self, client: redis.Redis, prefix: str) -> None:
        self._redis = client
        self._prefix = prefix
        self._reserve = client.register_script(_RESERVE_LUA)
        self._forget = client.register_script(_FORGET_LUA)

    def key(self, scope: str, key: str) -> str:
        """The Redis key of an idempotency record."""
        return idempotency_record_key(self._prefix, scope, key)

    def reserve(self, scope: str, key: str, params_hash: str, request_id: str, ttl_s: float) -> IdemOutcome:
        """Reserve the key for this request: NEW, SAME_REQUEST, DUPLICATE (of the first) or CONFLICT."""
        reply = self._reserve(keys=[self.key(scope, key)], args=[params_hash, request_id, _ms(ttl_s)])
        return IdemOutcome(IdemStatus(_text(reply[0])), _text(reply[1]))

    def forget(self, scope: str, key: str, request_id: str) -> bool:
        """Drop the reservation when this request holds it (it failed before any work); False otherwise."""
        return bool(self._forget(keys=[self.key(scope, key)], args=[request_id]))
