"""Defect 4 of issue 15: the Redis broker's defaults let a dead worker's messages come back within deadlines."""

from __future__ import annotations

from celeryconfig import build_config
from provider.settings import Settings


def test_redis_broker_defaults_recover_inside_the_shortest_deadline() -> None:
    settings = Settings(broker_url="redis://127.0.0.1:6379/0")
    options = build_config(settings)["broker_transport_options"]
    shortest_s = min(settings.timeouts.chat_s, settings.timeouts.embed_s, settings.timeouts.management_s)
    # a dead worker's message comes back after the visibility timeout plus one restore scan
    assert options["visibility_timeout"] + options["unacked_restore_interval"] < shortest_s
    # a worker killed while it held kombu's restore lock must not stop restores for long
    assert options["unacked_mutex_expire"] <= options["visibility_timeout"]
    assert settings.holder_ttl_s < shortest_s
