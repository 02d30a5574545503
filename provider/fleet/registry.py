"""The shared offering registry in Redis: what every live worker serves, renewed by heartbeat.

Each offering is stored as JSON under its own key with an expiry, and indexed in a sorted set scored by that
expiry, so a reader ignores entries whose worker stopped renewing them even before Redis expires the key.
Instances are recorded the same way with the management queue their worker consumes.

Records are signed by the worker that writes them (``provider.protocol.records``). A reader given a
``RecordAuthenticator`` skips, logs and counts (``refused``, and ``on_refused``) any record that does not parse,
that no worker key signed, or that does not validate; one bad record never stops routing.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

import redis
from pydantic import ValidationError

from provider.fleet.lanes import normalize_usage_type, slug
from provider.fleet.offerings import Offering, normalize_capability
from provider.fleet.redis_keys import RedisKeys
from provider.protocol.records import RecordAuthenticator, unwrap_unverified

log = logging.getLogger("provider.fleet.registry")
_VERIFIED_CACHE_SIZE = 4096

__all__ = ["CachedRegistry", "InstanceRecord", "OfferingRegistry"]

InstanceRecord = dict[str, Any]


class OfferingRegistry:
    """Register, renew and read offerings and instances shared by producers and workers."""

    def __init__(
        self,
        client: redis.Redis,
        keys: RedisKeys,
        *,
        ttl_s: float = 90.0,
        records: RecordAuthenticator | None = None,
        on_refused: Callable[[str], None] | None = None,
    ) -> None:
        self._redis = client
        self._keys = keys
        self.ttl_s = ttl_s
        self._records = records
        self._on_refused = on_refused
        self.refused: Counter[str] = Counter()
        self._verified: dict[bytes, Offering] = {}

    def _wrap(self, kind: str, record: dict[str, Any]) -> str:
        if self._records is None:
            return json.dumps({"record": record}, separators=(",", ":"))
        return self._records.wrap(kind, record)

    def _refuse(self, kind: str, reason: str) -> None:
        label = f"{kind}_{reason}"
        self.refused[label] += 1
        log.warning("skipping a registry %s record: %s", kind, reason)
        if self._on_refused is not None:
            self._on_refused(label)

    def _open(self, kind: str, raw: bytes | str) -> dict[str, Any] | None:
        """A stored record's content when it parses and (with an authenticator) a worker signed it."""
        if self._records is None:
            record = unwrap_unverified(raw)
            if record is None:
                self._refuse(kind, "malformed")
            return record
        record = self._records.open(kind, raw)
        if record is None:
            self._refuse(kind, "unauthenticated")
        return record

    def _offering(self, raw: bytes | str) -> Offering | None:
        """One stored offering, or None (skipped and counted) when it is not a worker's valid record."""
        data = raw if isinstance(raw, bytes) else raw.encode("utf-8", "surrogatepass")
        known = self._verified.get(data)
        if known is not None:
            return known
        record = self._open("offering", raw)
        if record is None:
            return None
        try:
            offering = Offering.model_validate(record)
        except ValidationError:
            self._refuse("offering", "invalid")
            return None
        if len(self._verified) >= _VERIFIED_CACHE_SIZE:
            self._verified.clear()
        self._verified[data] = offering
        return offering

    def _instance(self, raw: bytes | str) -> InstanceRecord | None:
        record = self._open("instance", raw)
        if record is not None and not isinstance(record.get("name"), str):
            self._refuse("instance", "invalid")
            return None
        return record

    def register(self, offerings: Iterable[Offering], *, ttl_s: float | None = None) -> int:
        """Write (or renew) offerings with an expiry; returns how many were written."""
        ttl = ttl_s or self.ttl_s
        expires_at = time.time() + ttl
        pipe = self._redis.pipeline(transaction=False)
        count = 0
        for offering in offerings:
            value = self._wrap("offering", offering.model_dump(mode="json"))
            pipe.set(self._keys.offering(offering.offering_id), value, px=int(ttl * 1000))
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
        values: Any = self._redis.mget([self._keys.offering(i) for i in ids])
        found = (self._offering(v) for v in values if v)
        return [offering for offering in found if offering is not None]

    def find(self, offering_id: str) -> Offering | None:
        """One offering by id, when live (and a worker's valid record)."""
        value: Any = self._redis.get(self._keys.offering(offering_id))
        return self._offering(value) if value else None

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
        pipe.set(self._keys.instance(name), self._wrap("instance", dict(record)), px=int(ttl * 1000))
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
        values: Any = self._redis.mget([self._keys.instance(n) for n in names])
        found = (self._instance(v) for v in values if v)
        return [record for record in found if record is not None]

    def instance(self, name: str) -> InstanceRecord | None:
        """One instance's record, when its worker is alive (and a worker wrote it)."""
        value: Any = self._redis.get(self._keys.instance(name))
        record = self._instance(value) if value else None
        return record if record is not None and record.get("name") == name else None


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
