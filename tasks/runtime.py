"""The process-wide fleet state: settings, Redis, the envelope codec, the ledger and the registry.

Built lazily on first use; ``tasks.app.configure`` replaces it (with the Celery app) through ``replace_runtime``.
"""

from __future__ import annotations

import os
import socket
import threading
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from redis import Redis

from provider.fleet.redis_keys import RedisKeys
from provider.fleet.registry import OfferingRegistry
from provider.protocol import EnvelopeCodec, IdempotencyStore, JtiLedger
from provider.protocol.records import RecordAuthenticator
from provider.settings import Settings, get_settings
from provider.sizing import redis_pool_size
from tasks.brokers import LaneBroker, broker_for
from tasks.metrics import REFUSED_REGISTRY_RECORDS
from tasks.stream_entries import EntrySealer

__all__ = ["FleetRuntime", "replace_runtime", "runtime"]


@dataclass
class FleetRuntime:
    """Everything a producer or worker needs, built once per process."""

    settings: Settings
    holder: str = field(default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}")

    @cached_property
    def redis(self) -> Redis:
        """Shared state: registry, streams, ledger (not the broker); pooled for every worker thread at once."""
        pool_size = redis_pool_size([instance.concurrency for instance in self.settings.usable_instances()])
        return Redis.from_url(self.settings.redis_url, health_check_interval=30, max_connections=pool_size)

    @cached_property
    def keys(self) -> RedisKeys:
        """Every key under the configured prefix."""
        return RedisKeys(self.settings.key_prefix)

    @cached_property
    def codec(self) -> EnvelopeCodec:
        """Builds, signs, seals and verifies envelopes."""
        return EnvelopeCodec(self.settings.security, max_lifetime_s=self.settings.timeouts.longest_s)

    @cached_property
    def ledger(self) -> JtiLedger:
        """Replay leases and stored results by jti."""
        return JtiLedger(self.redis, self.keys.ledger_prefix, lease_s=self.settings.lease_s)

    @cached_property
    def idempotency(self) -> IdempotencyStore:
        """Idempotency keys scoped to caller and operation."""
        return IdempotencyStore(self.redis, self.keys.ledger_prefix)

    @cached_property
    def registry(self) -> OfferingRegistry:
        """Live offerings and instances."""
        return OfferingRegistry(
            self.redis,
            self.keys,
            ttl_s=self.settings.registry_ttl_s,
            records=RecordAuthenticator(self.codec.keyring),
            on_refused=lambda reason: REFUSED_REGISTRY_RECORDS.labels(reason=reason).inc(),
        )

    @cached_property
    def broker(self) -> LaneBroker:
        """What differs between a Redis and a RabbitMQ broker (``tasks.brokers``), chosen once."""
        return broker_for(self.settings)

    def lane_depth(self, lane: str, connection: Any = None) -> int:
        """Messages waiting in a lane (``connection``: a kombu connection, needed on RabbitMQ)."""
        return self.broker.lane_depth(lane, connection)

    def count_hand_back(self, request_id: str, *, ttl_s: float) -> int:
        """Count one more hand-back of a request; returns the count so far."""
        key = self.keys.hand_backs(request_id)
        pipe = self.redis.pipeline(transaction=True)
        pipe.incr(key)
        pipe.pexpire(key, max(1, int(ttl_s * 1000)))
        return int(pipe.execute()[0])

    def close(self) -> None:
        """Release this runtime's Redis connections (a replaced runtime; anything still using it reconnects)."""
        client = self.__dict__.get("redis")
        if isinstance(client, Redis):
            client.close()

    def stream_sealer(self, request_id: str) -> EntrySealer:
        """Signs (workers) and checks (producers) a request's stream entries; seals them when encryption is on."""
        return EntrySealer(self.codec.keyring, request_id, encrypt=self.settings.security.encrypt)


_lock = threading.Lock()
_current: FleetRuntime | None = None


def runtime() -> FleetRuntime:
    """The current runtime, built from the process settings on first use."""
    global _current
    if _current is None:
        with _lock:
            if _current is None:
                _current = FleetRuntime(get_settings())
    return _current


def replace_runtime(fresh: FleetRuntime) -> FleetRuntime | None:
    """Make ``fresh`` the current runtime; returns the one it replaces (None before first use).

    ``tasks.app.configure`` switches the runtime and the Celery app together through this."""
    global _current
    with _lock:
        previous, _current = _current, fresh
    return previous
