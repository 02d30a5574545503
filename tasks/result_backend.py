"""Celery's Redis result backend, with each task state stored in one atomic round trip.

Stock Celery reads a task's stored state before every write (so that a late duplicate never overwrites a
SUCCESS) and then writes and publishes it in a second round trip: two round trips per result, and a window
between them in which a duplicate can still overwrite. One Lua script does the check, the write and the
publish at once. Everything else (result consumers, ``get()``, expiry, retries on connection errors) is
Celery's own; the fleet registers this class for the ``redis://`` and ``rediss://`` result backend URLs.

``complete_and_store``: a worker's successful answer goes to the jti ledger and to the result backend in one
script when both live on one Redis server (the result backend's database is selected inside the script), and
Celery's own store of that result is then skipped; on separate servers, or after a connection error, it is the
ledger's completion and then Celery's store, as before.
"""

from __future__ import annotations

from typing import Any

import redis
from celery import Task, states
from celery.backends.redis import RedisBackend
from celery.exceptions import BackendStoreError
from kombu.utils.encoding import bytes_to_str

from provider.protocol.codec import WORKER_SIGNATURE_FIELD
from provider.protocol.ledger import COMPLETE_RECORD_LUA, JtiLedger

__all__ = ["FleetRedisBackend", "complete_and_store", "install"]

# Set on the task's request once ``complete_and_store`` has stored its result: Celery's own store then skips it.
_STORED_MARK = "fleet_result_stored"
# What must match for two clients to reach the same server as the same user (the database may differ).
_SERVER_FIELDS = ("host", "port", "path", "username", "password", "credential_provider")

# KEYS[1]: the task's meta key. ARGV[1]: the encoded meta (JSON), ARGV[2]: seconds to keep it (0: for ever),
# ARGV[3]: the worker's signature when the value is a worker's signed answer, else "". A signed answer is written
# over anything but itself (whatever else is stored may be a forgery: only the producer can tell, by the
# signature); an unsigned state never replaces a stored SUCCESS. The new value is published to the result consumers.
_STORE_META_LUA = """
local function store_meta(key, value, ttl_s, signature)
  local current = redis.call('GET', key)
  if current and signature ~= '' then
    if string.find(current, signature, 1, true) then
      return 0
    end
  elseif current then
    local ok, meta = pcall(cjson.decode, current)
    if ok and type(meta) == 'table' and meta['status'] == 'SUCCESS' then
      return 0
    end
  end
  local ttl = tonumber(ttl_s)
  if ttl > 0 then
    redis.call('SET', key, value, 'EX', ttl)
  else
    redis.call('SET', key, value)
  end
  redis.call('PUBLISH', key, value)
  return 1
end
"""
_STORE_UNLESS_SUCCEEDED_LUA = _STORE_META_LUA + "return store_meta(KEYS[1], ARGV[1], ARGV[2], ARGV[3])\n"

# KEYS[1]: the jti's ledger record, KEYS[2]: the task's meta key. ARGV[1..3]: the ledger's completion (holder,
# result, ttl ms); ARGV[4..6]: the meta's store (value, ttl s, signature); ARGV[7]: the result backend's database
# when it is not the ledger's, else "" (a SELECT inside a script applies to that script alone; PUBLISH reaches
# subscribers of every database). Returns {ledger record completed, meta stored}.
_COMPLETE_AND_STORE_LUA = (
    COMPLETE_RECORD_LUA
    + _STORE_META_LUA
    + """
local completed = complete_record(KEYS[1], ARGV[1], ARGV[2], ARGV[3])
if ARGV[7] ~= '' then redis.call('SELECT', tonumber(ARGV[7])) end
return {completed, store_meta(KEYS[2], ARGV[4], ARGV[5], ARGV[6])}
"""
)


class FleetRedisBackend(RedisBackend):
    """``RedisBackend`` whose task results are checked, stored and published by one script."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._store_script: Any = None
        # by id of the ledger's client, kept with the client (so that its id is not reused while cached)
        self._combined: dict[int, tuple[redis.Redis, tuple[Any, str] | None]] = {}

    def _store_result(
        self,
        task_id: str,
        result: Any,
        state: str,
        traceback: Any = None,
        request: Any = None,
        **kwargs: Any,
    ) -> Any:
        if state == states.SUCCESS and request is not None and getattr(request, _STORED_MARK, None) == task_id:
            return result  # complete_and_store wrote it with the ledger's record
        key, value, expires, signed = self._meta_write(task_id, result, state, traceback, request)
        self.ensure(self._store_unless_succeeded, (key, value, expires, signed))
        return result

    def _meta_write(
        self, task_id: str, result: Any, state: str, traceback: Any, request: Any
    ) -> tuple[Any, Any, int, str]:
        """The meta key, its encoded value, its expiry (s, 0: none) and the worker signature to store it with."""
        celery_backend: Any = self  # parts of RedisBackend the type stubs do not declare
        meta = celery_backend._get_result_meta(result=result, state=state, traceback=traceback, request=request)
        meta["task_id"] = bytes_to_str(task_id)
        value = self.encode(meta)
        if isinstance(value, str) and len(value) > self._MAX_STR_VALUE_SIZE:
            raise BackendStoreError("value too large for Redis backend", state=state, task_id=task_id)
        expires = celery_backend.failure_expires if state == states.FAILURE else celery_backend.expires
        return self.get_key_for_task(task_id), value, int(expires or 0), _answer_signature(result, state)

    def combined_with(self, client: redis.Redis) -> tuple[Any, str] | None:
        """The ledger-and-result script on ``client`` and the result database argument ("" when it is
        ``client``'s own), when ``client`` reaches this backend's Redis server as the same user; else None."""
        known = self._combined.get(id(client))
        if known is not None and known[0] is client:
            return known[1]
        ours = self.client.connection_pool.connection_kwargs
        theirs = client.connection_pool.connection_kwargs
        same_server = self.client.connection_pool.connection_class is client.connection_pool.connection_class and all(
            ours.get(name) == theirs.get(name) for name in _SERVER_FIELDS
        )
        combined: tuple[Any, str] | None = None
        if same_server:
            db = int(ours.get("db") or 0)
            combined = (
                client.register_script(_COMPLETE_AND_STORE_LUA),
                "" if db == int(theirs.get("db") or 0) else str(db),
            )
        self._combined[id(client)] = (client, combined)
        return combined

    def store_with_ledger(
        self, task: Task[Any, Any], ledger: JtiLedger, holder: str, response: Any, ttl_s: float
    ) -> bool:
        """Complete the task's jti in ``ledger`` and store ``response`` as its SUCCESS in one script; False (nothing
        done) when the ledger is on another server."""
        combined = self.combined_with(ledger.client)
        if combined is None:
            return False
        script, db = combined
        request = task.request
        task_id = str(request.id)
        ledger_key, ledger_args = ledger.completion(task_id, holder, response, ttl_s)
        key, value, expires, signed = self._meta_write(task_id, response, states.SUCCESS, None, request)
        script(keys=[ledger_key, key], args=[*ledger_args, value, expires, signed, db])
        setattr(request, _STORED_MARK, task_id)
        return True

    def _store_unless_succeeded(self, key: Any, value: Any, expires: Any, signature: str = "") -> Any:
        if self._store_script is None:
            self._store_script = self.client.register_script(_STORE_UNLESS_SUCCEEDED_LUA)
        return self._store_script(keys=[key], args=[value, int(expires or 0), signature])


def _answer_signature(result: Any, state: str) -> str:
    """The worker signature when this process stores a worker's signed answer (a response, or a typed error's
    envelope), else "".

    Only the worker's own code path stores such values here; anyone else writing to Redis directly never goes
    through this method, and the producer checks the signature of whatever it reads anyway.
    """
    from tasks.errors import FleetTaskError

    if state == states.SUCCESS:
        envelope = result
    elif state == states.FAILURE and isinstance(result, FleetTaskError):
        envelope = result.envelope
    else:
        return ""
    signature = envelope.get(WORKER_SIGNATURE_FIELD) if isinstance(envelope, dict) else None
    sig = signature.get("sig") if isinstance(signature, dict) else None
    return sig if isinstance(sig, str) and sig else ""


def complete_and_store(task: Task[Any, Any], ledger: JtiLedger, holder: str, response: Any, ttl_s: float) -> None:
    """Complete the running task's jti with its signed ``response`` and store the same as the task's result:
    one round trip when the ledger and the result backend share a Redis server, else the ledger's completion
    now and Celery's store when the task returns."""
    backend = task.backend
    request = task.request
    if isinstance(backend, FleetRedisBackend) and not request.is_eager and not _ignores_result(task):
        try:
            if backend.store_with_ledger(task, ledger, holder, response, ttl_s):
                return
        except (redis.ConnectionError, redis.TimeoutError, BackendStoreError):
            pass  # the script runs whole or not at all: the two writes below are safe to repeat
    ledger.complete(str(request.id), holder, response, ttl_s=ttl_s)


def _ignores_result(task: Task[Any, Any]) -> bool:
    """Whether Celery would not store this task's result (the task or the request says so)."""
    return bool(task.ignore_result or getattr(task.request, "ignore_result", False))


def install(loader: Any) -> None:
    """Make ``loader`` build a FleetRedisBackend for ``redis://`` and ``rediss://`` result backend URLs."""
    backend = f"{__name__}:{FleetRedisBackend.__name__}"
    loader.override_backends = {**getattr(loader, "override_backends", {}), "redis": backend, "rediss": backend}
