"""The shared offering registry in Redis: what every live worker serves, renewed by heartbeat.

Each offering is stored as JSON under its own key with an expiry, and indexed in a sorted set scored by that
expiry, so a reader ignores entries whose worker stopped renewing them even before Redis expires the key.
Instances are recorded the same way with the management queue their worker consumes.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterable
from typing import Any

import redis

from provider.lanes import normalize_usage_type, slug
from provider.offerings import Offering, normalize_capability
from provider.redis_keys import RedisKeys

__all__ = ["CachedRegistry", "InstanceRecord", "OfferingRegistry"]

InstanceRecord = dict[str, Any]


class OfferingRegistry:
    """Register, renew and read offerings and instances shared by producers and workers."""

    def __init__(self, client: redis.Redis, keys: RedisKeys, *, ttl_s: float = 90.0) -> None:
        self._redis = client
        self._keys = keys
        self.ttl_s = ttl_s

    def register(self, offerings: Iterable[Offering], *, ttl_s: float | None = None) -> int:
        """Write (or renew) offerings with an expiry; returns how many were written."""
        ttl = ttl_s or self.ttl_s
        expires_at = time.time() + ttl
        pipe = self._redis.pipeline(transaction=False)
        count = 0
        for offering in offerings:
            pipe.set(self._keys.offering(offering.offering_id), offering.model_dump_json(), px=int(ttl * 1000))
            pipe.zadd(self._keys.offerings, {offering.offering_id: expires_at})
            count += 1
        if count:
            pipe.execute()
        return count

    def unregister(self, offering_ids: Iterable[str]) -> None:
        """Remove offerings at once (an instance that no longer serves a model)."""
        ids = list(offering_ids)
        if not ids:
            return
        pipe = self._redis.pipeline(transaction=False)
        for offering_id in ids:
            pipe.delete(self._keys.offering(offering_id))
        pipe.zrem(self._keys.offerings, *ids)
        pipe.execute()

    def live_ids(self) -> list[str]:
        """Ids of offerings whose expiry is still ahead."""
        now = time.time()
        self._redis.zremrangebyscore(self._keys.offerings, "-inf", now)
        raw = self._redis.zrangebyscore(self._keys.offerings, now, "+inf")
        return [item.decode() if isinstance(item, bytes) else str(item) for item in raw]

    def all(self) -> list[Offering]:
        """Every live offering."""
        ids = self.live_ids()
        if not ids:
            return []
        values = self._redis.mget([self._keys.offering(i) for i in ids])
        return [Offering.model_validate_json(v) for v in values if v]

    def find(self, offering_id: str) -> Offering | None:
        """One offering by id, when live."""
        value = self._redis.get(self._keys.offering(offering_id))
        return Offering.model_validate_json(value) if value else None

    def find_by_model_alias(self, alias: str) -> list[Offering]:
        """Live offerings of a model, by its canonical alias or its served name (slugs compare equal)."""
        wanted = slug(alias)
        return [o for o in self.all() if wanted in (slug(o.canonical_alias), slug(o.model))]

    def filter(
        self,
        *,
        provider_family: str | None = None,
        instance: str | None = None,
        model_family: str | None = None,
        capability: str | None = None,
        usage: str | None = None,
        tier: str | None = None,
    ) -> list[Offering]:
        """Live offerings matching every criterion given."""
        wanted_capability = normalize_capability(capability) if capability else None
        return [
            o
            for o in self.all()
            if (provider_family is None or o.provider_family == provider_family)
            and (instance is None or o.instance_id == instance)
            and (model_family is None or o.model_family == model_family)
            and (wanted_capability is None or wanted_capability in o.capabilities)
            and (usage is None or o.usage_type == normalize_usage_type(usage))
            and (tier is None or o.tier == tier)
        ]

    def register_instance(self, record: InstanceRecord, *, ttl_s: float | None = None) -> None:
        """Record an instance served by a live worker (name, management queue, tier, live state)."""
        ttl = ttl_s or self.ttl_s
        name = str(record["name"])
        pipe = self._redis.pipeline(transaction=False)
        pipe.set(self._keys.instance(name), json.dumps(record), px=int(ttl * 1000))
        pipe.zadd(self._keys.instances, {name: time.time() + ttl})
        pipe.execute()

    def unregister_instance(self, name: str, *, holder: str | None = None) -> None:
        """Remove an instance record (only the holder's own, when ``holder`` is given)."""
        record = self.instance(name)
        if record is None or (holder is not None and record.get("holder") != holder):
            return
        pipe = self._redis.pipeline(transaction=False)
        pipe.delete(self._keys.instance(name))
        pipe.zrem(self._keys.instances, name)
        pipe.execute()

    def instances(self) -> list[InstanceRecord]:
        """Every instance whose worker is alive."""
        now = time.time()
        self._redis.zremrangebyscore(self._keys.instances, "-inf", now)
        names = [
            n.decode() if isinstance(n, bytes) else str(n)
            for n in self._redis.zrangebyscore(self._keys.instances, now, "+inf")
        ]
        if not names:
            return []
        values = self._redis.mget([self._keys.instance(n) for n in names])
        return [json.loads(v) for v in values if v]

    def instance(self, name: str) -> InstanceRecord | None:
        """One instance's record, when its worker is alive."""
        value = self._redis.get(self._keys.instance(name))
        return json.loads(value) if value else None


class CachedRegistry:
    """An in-process cache of the live offerings, refreshed after ``ttl_s`` or when ``invalidate`` is called
    (producers call it on every registry event that is not a heartbeat)."""

    def __init__(self, registry: OfferingRegistry, *, ttl_s: float = 1.0) -> None:
        self._registry = registry
        self._ttl_s = ttl_s
        self._lock = threading.Lock()
        self._loaded_at = float("-inf")
        self._offerings: list[Offering] = []

    def all(self) -> list[Offering]:
        """The live offerings, from the cache while it is fresh."""
        now = time.monotonic()
        with self._lock:
            if now - self._loaded_at < self._ttl_s:
                return self._offerings
        fresh = self._registry.all()
        with self._lock:
            self._offerings, self._loaded_at = fresh, now
        return fresh

    def invalidate(self) -> None:
        """Drop the cache: the next read goes to Redis."""
        with self._lock:
            self._loaded_at = float("-inf")
