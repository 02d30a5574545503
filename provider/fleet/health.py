"""Per-instance health shared by every worker in Redis: a circuit breaker, rolling latency and a penalty.

One hash per instance (``RedisKeys.health``), changed only by Lua scripts, so workers on many hosts agree:

``circuit``
    ``closed`` (calls flow), ``open`` (calls refused; set after ``failure_threshold`` consecutive failures)
    or ``half_open`` (one probe call granted after ``half_open_after_s``; its success closes the circuit,
    its failure opens it again). A probe that never reports back frees the slot after ``probe_timeout_s``.
    The probe goes only to a call with at least ``probe_min_time_left_s`` before its deadline: a request
    about to expire would time out and reopen the circuit whatever the instance's health.
``failures``, ``opened_at``, ``probe_until``, ``last_error``
    Consecutive failures, when the circuit opened and until when the granted probe holds the half-open slot
    (epoch seconds from the tracker's clock), and the last failure's error code (a code, never a message).
``latencies``, ``latency_avg``, ``latency_p50``, ``samples``, ``penalty``
    The last ``latency_window`` successful call latencies (JSON array, seconds), their mean and median, and
    ``max(0, avg / latency_threshold_s - 1)``: 0 while the mean is within the threshold, 1.0 at twice it.

A success closes the circuit from any state (the instance answered); a failure while half-open reopens it.
Times come from the injected clock (``time.time`` by default), so hosts need synchronised clocks.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Final, Literal, cast

import redis

from provider.fleet.events import scrub_text
from provider.fleet.redis_keys import RedisKeys
from provider.settings import CIRCUIT_FAILURE_THRESHOLD, CIRCUIT_HALF_OPEN_AFTER_S, Settings

__all__ = [
    "DEFAULT_LATENCY_WINDOW",
    "DEFAULT_PROBE_MIN_TIME_LEFT_S",
    "HEALTH_KEY_TTL_S",
    "MAX_ERROR_CODE_CHARS",
    "CircuitState",
    "HealthTracker",
    "InstanceHealth",
]

CircuitState = Literal["closed", "open", "half_open"]

DEFAULT_LATENCY_WINDOW: Final = 50
DEFAULT_PROBE_MIN_TIME_LEFT_S: Final = 5.0
# A health hash outlives its last update by this long (an instance gone for a day is forgotten).
HEALTH_KEY_TTL_S: Final = 86_400.0
MAX_ERROR_CODE_CHARS: Final = 64
_MS_PER_S: Final = 1000
_FIELDS: Final = (
    "circuit",
    "failures",
    "opened_at",
    "probe_until",
    "last_error",
    "latency_avg",
    "latency_p50",
    "samples",
    "penalty",
)

# KEYS[1] health hash; ARGV now, latency_s, window, threshold_s ('' = none), ttl_ms
_SUCCESS_LUA: Final = """
local raw = redis.call('HGET', KEYS[1], 'latencies')
local window = tonumber(ARGV[3])
local lat = {}
if raw then lat = cjson.decode(raw) end
table.insert(lat, tonumber(ARGV[2]))
while #lat > window do table.remove(lat, 1) end
local sum = 0
local sorted = {}
for i, v in ipairs(lat) do
  sum = sum + v
  sorted[i] = v
end
table.sort(sorted)
local n = #sorted
local avg = sum / n
local p50
if n % 2 == 1 then p50 = sorted[(n + 1) / 2] else p50 = (sorted[n / 2] + sorted[n / 2 + 1]) / 2 end
local penalty = 0
local threshold = tonumber(ARGV[4])
if threshold and threshold > 0 and avg > threshold then penalty = avg / threshold - 1 end
redis.call('HSET', KEYS[1], 'circuit', 'closed', 'failures', 0, 'latencies', cjson.encode(lat),
           'latency_avg', tostring(avg), 'latency_p50', tostring(p50), 'samples', n,
           'penalty', tostring(penalty), 'updated_at', ARGV[1])
redis.call('HDEL', KEYS[1], 'opened_at', 'probe_until')
redis.call('PEXPIRE', KEYS[1], ARGV[5])
return 'closed'
"""

# KEYS[1] health hash; ARGV now, failure_threshold, error_code, ttl_ms
_FAILURE_LUA: Final = """
local rec = redis.call('HMGET', KEYS[1], 'circuit', 'failures')
local circuit = rec[1] or 'closed'
local failures = (tonumber(rec[2]) or 0) + 1
redis.call('HSET', KEYS[1], 'failures', failures, 'last_error', ARGV[3], 'updated_at', ARGV[1])
if circuit == 'half_open' or (circuit ~= 'open' and failures >= tonumber(ARGV[2])) then
  redis.call('HSET', KEYS[1], 'circuit', 'open', 'opened_at', ARGV[1])
  redis.call('HDEL', KEYS[1], 'probe_until')
  circuit = 'open'
elseif circuit ~= 'open' then
  redis.call('HSET', KEYS[1], 'circuit', 'closed')
  circuit = 'closed'
end
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return circuit
"""

# KEYS[1] health hash; ARGV now, half_open_after_s, probe_timeout_s, ttl_ms, time_left_s, probe_min_time_left_s.
# 1 = the call may go ahead. The probe goes only to a call with time enough left to answer.
_ALLOW_LUA: Final = """
local now = tonumber(ARGV[1])
local rec = redis.call('HMGET', KEYS[1], 'circuit', 'opened_at', 'probe_until')
local circuit = rec[1]
if circuit == 'open' then
  if now < (tonumber(rec[2]) or 0) + tonumber(ARGV[2]) then return 0 end
elseif circuit == 'half_open' then
  if now < (tonumber(rec[3]) or 0) then return 0 end
else
  return 1
end
if tonumber(ARGV[5]) < tonumber(ARGV[6]) then return 0 end
redis.call('HSET', KEYS[1], 'circuit', 'half_open', 'probe_until', tostring(now + tonumber(ARGV[3])),
           'updated_at', ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return 1
"""


@dataclass(frozen=True, slots=True)
class InstanceHealth:
    """One instance's circuit and latency as a reader sees them now."""

    instance: str
    circuit: CircuitState = "closed"
    consecutive_failures: int = 0
    opened_at: float | None = None
    retry_after_s: float | None = None
    probe_in_flight: bool = False
    last_error: str | None = None
    latency_avg_s: float | None = None
    latency_p50_s: float | None = None
    latency_samples: int = 0
    penalty: float = 0.0

    @property
    def available(self) -> bool:
        """Whether a call may be tried (closed, or half-open with the probe slot free)."""
        return self.circuit == "closed" or (self.circuit == "half_open" and not self.probe_in_flight)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready copy, safe for an offering's health or a registry event (codes only, no messages)."""
        return asdict(self)


class HealthTracker:
    """Circuit breaker and latency of each instance, shared through Redis by every worker."""

    def __init__(
        self,
        redis_client: redis.Redis,
        keys: RedisKeys,
        *,
        failure_threshold: int = CIRCUIT_FAILURE_THRESHOLD,
        half_open_after_s: float = CIRCUIT_HALF_OPEN_AFTER_S,
        latency_window: int = DEFAULT_LATENCY_WINDOW,
        latency_threshold_s: float | None = None,
        probe_timeout_s: float | None = None,
        probe_min_time_left_s: float = DEFAULT_PROBE_MIN_TIME_LEFT_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if failure_threshold < 1:
            raise ValueError("failure_threshold must be at least 1")
        if half_open_after_s < 0:
            raise ValueError("half_open_after_s must not be negative")
        if latency_window < 1:
            raise ValueError("latency_window must be at least 1")
        if latency_threshold_s is not None and latency_threshold_s <= 0:
            raise ValueError("latency_threshold_s must be positive")
        self._redis = redis_client
        self._keys = keys
        self.failure_threshold = failure_threshold
        self.half_open_after_s = half_open_after_s
        self.latency_window = latency_window
        self.latency_threshold_s = latency_threshold_s
        self.probe_timeout_s = half_open_after_s if probe_timeout_s is None else probe_timeout_s
        self.probe_min_time_left_s = probe_min_time_left_s
        self._clock = clock
        self._ttl_ms = round(max(HEALTH_KEY_TTL_S, 2 * half_open_after_s) * _MS_PER_S)
        self._success = redis_client.register_script(_SUCCESS_LUA)
        self._failure = redis_client.register_script(_FAILURE_LUA)
        self._allow = redis_client.register_script(_ALLOW_LUA)

    @classmethod
    def from_settings(
        cls, redis_client: redis.Redis, settings: Settings, *, clock: Callable[[], float] = time.time
    ) -> HealthTracker:
        """A tracker with the fleet's circuit and latency settings and key prefix."""
        return cls(
            redis_client,
            RedisKeys(settings.key_prefix),
            failure_threshold=settings.circuit_failure_threshold,
            half_open_after_s=settings.circuit_half_open_after_s,
            latency_window=settings.latency_window,
            latency_threshold_s=settings.latency_penalty_threshold_s,
            probe_min_time_left_s=settings.circuit_probe_min_time_left_s,
            clock=clock,
        )

    def allow(self, instance: str, time_left_s: float = float("inf")) -> bool:
        """Whether a call to ``instance`` may go ahead; the one half-open probe goes to exactly one caller,
        and only to one with ``probe_min_time_left_s`` or more left before its deadline (``time_left_s``)."""
        reply = self._allow(
            keys=[self._keys.health(instance)],
            args=[
                repr(self._clock()),
                repr(self.half_open_after_s),
                repr(self.probe_timeout_s),
                self._ttl_ms,
                repr(min(float(time_left_s), 1e12)),
                repr(self.probe_min_time_left_s),
            ],
        )
        return int(cast(int, reply)) == 1

    def record_success(self, instance: str, latency_s: float) -> CircuitState:
        """A call answered in ``latency_s``: close the circuit, reset failures, add the latency sample."""
        if latency_s < 0:
            raise ValueError("latency_s must not be negative")
        threshold = "" if self.latency_threshold_s is None else repr(self.latency_threshold_s)
        reply = self._success(
            keys=[self._keys.health(instance)],
            args=[repr(self._clock()), repr(float(latency_s)), self.latency_window, threshold, self._ttl_ms],
        )
        return cast(CircuitState, _text(reply))

    def record_failure(self, instance: str, error_code: str) -> CircuitState:
        """A call failed with ``error_code`` (a short code, e.g. ``server_busy``): maybe open the circuit."""
        code = scrub_text(error_code)[:MAX_ERROR_CODE_CHARS]
        reply = self._failure(
            keys=[self._keys.health(instance)],
            args=[repr(self._clock()), self.failure_threshold, code, self._ttl_ms],
        )
        return cast(CircuitState, _text(reply))

    def state(self, instance: str) -> InstanceHealth:
        """The instance's health now; an open circuit past its interval reads as ``half_open``."""
        values = self._redis.hmget(self._keys.health(instance), list(_FIELDS))
        record = dict(zip(_FIELDS, (None if value is None else _text(value) for value in values), strict=True))
        now = self._clock()
        stored = record["circuit"] or "closed"
        opened_at = _float(record["opened_at"])
        probe_until = _float(record["probe_until"])
        circuit: CircuitState = "closed"
        retry_after_s: float | None = None
        probe_in_flight = False
        if stored == "open":
            reopen_at = (opened_at or 0.0) + self.half_open_after_s
            circuit = "open" if now < reopen_at else "half_open"
            retry_after_s = max(0.0, reopen_at - now)
        elif stored == "half_open":
            circuit = "half_open"
            probe_in_flight = probe_until is not None and now < probe_until
            retry_after_s = max(0.0, probe_until - now) if probe_until is not None else 0.0
        return InstanceHealth(
            instance=instance,
            circuit=circuit,
            consecutive_failures=int(record["failures"] or 0),
            opened_at=opened_at,
            retry_after_s=retry_after_s,
            probe_in_flight=probe_in_flight,
            last_error=record["last_error"],
            latency_avg_s=_float(record["latency_avg"]),
            latency_p50_s=_float(record["latency_p50"]),
            latency_samples=int(record["samples"] or 0),
            penalty=_float(record["penalty"]) or 0.0,
        )

    def reset(self, instance: str) -> None:
        """Forget everything about ``instance`` (an operator's manual close)."""
        self._redis.delete(self._keys.health(instance))


def _text(value: object) -> str:
    """A Redis reply as text (clients may or may not decode responses)."""
    if isinstance(value, bytes):
        return value.decode("utf-8")
    return str(value)


def _float(value: str | None) -> float | None:
    """A stored number, or None when absent."""
    return None if value is None or value == "" else float(value)
