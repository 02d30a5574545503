"""When a worker should stop taking work from its lanes: vLLM's load gauges, read sparingly, with hysteresis.

``CapacityGate.should_pause()`` pauses when the server's waiting queue exceeds ``max_waiting`` or its
KV-cache usage exceeds ``max_kv_cache_usage``, and resumes only once every configured gauge is back at or
below ``resume_ratio`` times its threshold, so a load hovering at the threshold does not flap consumers.
Metrics are read at most once per ``min_interval_s``; a failed read changes nothing (the last decision
stands), so a flaky ``/metrics`` never opens or closes the gate by itself.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Final

from provider.settings import Settings
from provider.vllm.models import MetricsSnapshot

__all__ = ["CAPACITY_CHECK_INTERVAL_S", "DEFAULT_RESUME_RATIO", "CapacityGate"]

logger = logging.getLogger(__name__)

CAPACITY_CHECK_INTERVAL_S: Final = 1.0
DEFAULT_RESUME_RATIO: Final = 0.8


class CapacityGate:
    """Pause/resume decisions for a worker's lane consumers from its vLLM instance's load gauges."""

    def __init__(
        self,
        read_metrics: Callable[[], MetricsSnapshot],
        *,
        max_waiting: int | None,
        max_kv_cache_usage: float | None,
        min_interval_s: float = CAPACITY_CHECK_INTERVAL_S,
        resume_ratio: float = DEFAULT_RESUME_RATIO,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_waiting is not None and max_waiting < 0:
            raise ValueError("max_waiting must not be negative")
        if max_kv_cache_usage is not None and not 0 <= max_kv_cache_usage <= 1:
            raise ValueError("max_kv_cache_usage is a fraction between 0 and 1")
        if min_interval_s < 0:
            raise ValueError("min_interval_s must not be negative")
        if not 0 < resume_ratio <= 1:
            raise ValueError("resume_ratio must be in (0, 1]")
        self._read_metrics = read_metrics
        self.max_waiting = max_waiting
        self.max_kv_cache_usage = max_kv_cache_usage
        self.min_interval_s = min_interval_s
        self.resume_ratio = resume_ratio
        self._clock = clock
        self._paused = False
        self._last_read_at: float | None = None
        self.last_snapshot: MetricsSnapshot | None = None
        self.read_errors = 0

    @classmethod
    def from_settings(
        cls,
        read_metrics: Callable[[], MetricsSnapshot],
        settings: Settings,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> CapacityGate:
        """A gate with the fleet's thresholds (both unset: a gate that never pauses and never reads)."""
        return cls(
            read_metrics,
            max_waiting=settings.pause_when_waiting_over,
            max_kv_cache_usage=settings.pause_when_kv_cache_over,
            min_interval_s=settings.capacity_check_interval_s,
            resume_ratio=settings.capacity_resume_ratio,
            clock=clock,
        )

    @property
    def enabled(self) -> bool:
        """Whether any threshold is set (a gate without one never reads metrics)."""
        return self.max_waiting is not None or self.max_kv_cache_usage is not None

    @property
    def paused(self) -> bool:
        """The last decision, without reading metrics."""
        return self._paused

    def should_pause(self) -> bool:
        """Whether consumers should be paused now (reads metrics when the last read is old enough)."""
        if not self.enabled:
            return False
        now = self._clock()
        if self._last_read_at is not None and now - self._last_read_at < self.min_interval_s:
            return self._paused
        self._last_read_at = now
        try:
            snapshot = self._read_metrics()
        except Exception as exc:  # any failure to read is "no news": keep the last decision
            self.read_errors += 1
            logger.debug(
                "capacity check: metrics read failed (%s); keeping paused=%s",
                type(exc).__name__,
                self._paused,
            )
            return self._paused
        self.last_snapshot = snapshot
        paused = not self._recovered(snapshot) if self._paused else self._over(snapshot)
        if paused != self._paused:
            logger.info(
                "capacity: %s (waiting=%d, kv_cache_usage=%s)",
                "pausing" if paused else "resuming",
                snapshot.waiting,
                snapshot.kv_cache_usage,
            )
        self._paused = paused
        return paused

    def _over(self, snapshot: MetricsSnapshot) -> bool:
        """Whether any gauge is above its threshold."""
        if self.max_waiting is not None and snapshot.waiting > self.max_waiting:
            return True
        kv = snapshot.kv_cache_usage
        return self.max_kv_cache_usage is not None and kv is not None and kv > self.max_kv_cache_usage

    def _recovered(self, snapshot: MetricsSnapshot) -> bool:
        """Whether every gauge is at or below ``resume_ratio`` of its threshold."""
        if self.max_waiting is not None and snapshot.waiting > self.resume_ratio * self.max_waiting:
            return False
        kv = snapshot.kv_cache_usage
        return not (
            self.max_kv_cache_usage is not None and kv is not None and kv > self.resume_ratio * self.max_kv_cache_usage
        )
