"""The fleet's periodic work: a discovery refresh on every instance, every 1800 s unless configured."""

from __future__ import annotations

from typing import Any

from provider.settings import Settings

REFRESH_TASK = "vllm.discover"


def build_beat_schedule(settings: Settings) -> dict[str, dict[str, Any]]:
    """Celery Beat entries; the producer API signs each message when Beat sends it."""
    return {
        "fleet-discovery-refresh": {
            "task": REFRESH_TASK,
            "schedule": float(settings.discovery_interval_s),
            "kwargs": {"instance": "all"},
            "options": {"expires": float(settings.discovery_interval_s)},
        },
    }
