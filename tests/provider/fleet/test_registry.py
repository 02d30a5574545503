"""The Redis offering registry: expiry, lookups by alias and filters, and the in-process cache."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
import redis

from provider.fleet.offerings import Offering
from provider.fleet.redis_keys import RedisKeys
from provider.fleet.registry import CachedRegistry, OfferingRegistry
from tests.conftest import REDIS_HOST, REDIS_PORT, require_server, wait_until


@pytest.fixture
def registry() -> Iterator[OfferingRegistry]:
    require_server("Redis", REDIS_HOST, REDIS_PORT)
    client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=15)
    keys = RedisKeys(f"reg-{uuid.uuid4().hex[:8]}")
    yield OfferingRegistry(client, keys, ttl_s=5.0)
    for key in client.scan_iter(f"{keys.prefix}:*"):
        client.delete(key)


def _offering(instance: str, model: str, **extra: object) -> Offering:
    return Offering.model_validate({"instance_id": instance, "model": model, "context_window": 4096, **extra})


def test_entries_expire_unless_renewed(registry: OfferingRegistry) -> None:
    registry.register([_offering("a", "m1")], ttl_s=1.0)
    assert [o.model for o in registry.all()] == ["m1"]
    wait_until(lambda: registry.all() == [], 10.0, "the entry expiring")  # however busy the host


def test_find_by_model_alias_and_filters(registry: OfferingRegistry) -> None:
    chat = _offering("gpu-1", "Qwen3.6:27B", capabilities=("chat", "tools"), tier="direct")
    embed = _offering("gpu-2", "minilm", capabilities=("embedding",), usage_type="embedding", tier="local")
    registry.register([chat, embed])
    assert [o.instance_id for o in registry.find_by_model_alias("qwen3-6-27b")] == ["gpu-1"]
    assert [o.model for o in registry.filter(capability="function_calling")] == ["Qwen3.6:27B"]
    assert [o.model for o in registry.filter(usage="embeddings")] == ["minilm"]
    assert [o.model for o in registry.filter(tier="local", instance="gpu-2")] == ["minilm"]
    assert registry.filter(instance="gpu-1", usage="embedding") == []
    assert registry.find(chat.offering_id) == chat


def test_cache_serves_until_invalidated(registry: OfferingRegistry) -> None:
    cache = CachedRegistry(registry, ttl_s=60.0)
    registry.register([_offering("a", "m1")])
    assert [o.model for o in cache.all()] == ["m1"]
    registry.register([_offering("a", "m2")])
    assert [o.model for o in cache.all()] == ["m1"], "fresh cache entries are served from memory"
    cache.invalidate()
    assert sorted(o.model for o in cache.all()) == ["m1", "m2"]
