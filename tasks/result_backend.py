"""Celery's Redis result backend, with each task state stored in one atomic round trip.

Stock Celery reads a task's stored state before every write (so that a late duplicate never overwrites a
SUCCESS) and then writes and publishes it in a second round trip: two round trips per result, and a window
between them in which a duplicate can still overwrite. One Lua script does the check, the write and the
publish at once. Everything else (result consumers, ``get()``, expiry, retries on connection errors) is
Celery's own; the fleet registers this class for the ``redis://`` and ``rediss://`` result backend URLs.
"""

from __future__ import annotations

from typing import Any

from celery import states
from celery.backends.redis import RedisBackend
from celery.exceptions import BackendStoreError
from kombu.utils.encoding import bytes_to_str

from provider.protocol.codec import WORKER_SIGNATURE_FIELD

__all__ = ["FleetRedisBackend", "install"]

# KEYS[1]: the task's meta key. ARGV[1]: the encoded meta (JSON), ARGV[2]: seconds to keep it (0: for ever),
# ARGV[3]: the worker's signature when the value is a worker's signed answer, else "". A signed answer is written
# over anything but itself (whatever else is stored may be a forgery: only the producer can tell, by the
# signature); an unsigned state never replaces a stored SUCCESS. The new value is published to the result consumers.
_STORE_UNLESS_SUCCEEDED_LUA = """
local current = redis.call('GET', KEYS[1])
if current and ARGV[3] ~= '' then
  if string.find(current, ARGV[3], 1, true) then
    return 0
  end
elseif current then
  local ok, meta = pcall(cjson.decode, current)
  if ok and type(meta) == 'table' and meta['status'] == 'SUCCESS' then
    return 0
  end
end
local ttl = tonumber(ARGV[2])
if ttl > 0 then
  redis.call('SET', KEYS[1], ARGV[1], 'EX', ttl)
else
  redis.call('SET', KEYS[1], ARGV[1])
end
redis.call('PUBLISH', KEYS[1], ARGV[1])
return 1
"""


class FleetRedisBackend(RedisBackend):
    """``RedisBackend`` whose task results are checked, stored and published by one script."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._store_script: Any = None

    def _store_result(
        self,
        task_id: str,
        result: Any,
        state: str,
        traceback: Any = None,
        request: Any = None,
        **kwargs: Any,
    ) -> Any:
        celery_backend: Any = self  # parts of RedisBackend the type stubs do not declare
        meta = celery_backend._get_result_meta(result=result, state=state, traceback=traceback, request=request)
        meta["task_id"] = bytes_to_str(task_id)
        value = self.encode(meta)
        if isinstance(value, str) and len(value) > self._MAX_STR_VALUE_SIZE:
            raise BackendStoreError("value too large for Redis backend", state=state, task_id=task_id)
        expires = celery_backend.failure_expires if state == states.FAILURE else celery_backend.expires
        signed = _answer_signature(result, state)
        self.ensure(self._store_unless_succeeded, (self.get_key_for_task(task_id), value, expires, signed))
        return result

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


def install(loader: Any) -> None:
    """Make ``loader`` build a FleetRedisBackend for ``redis://`` and ``rediss://`` result backend URLs."""
    backend = f"{__name__}:{FleetRedisBackend.__name__}"
    loader.override_backends = {**getattr(loader, "override_backends", {}), "redis": backend, "rediss": backend}
