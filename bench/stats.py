"""Pure statistics helpers: percentiles, latency summaries, paired differences and rates.

Everything here works on plain lists of floats so it can be tested without any server.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

__all__ = ["cores_used", "gaps_ms", "paired_differences", "percentile", "rate", "summarize"]

SUMMARY_PERCENTILES = (50.0, 90.0, 99.0)


def percentile(values: Sequence[float], pct: float) -> float:
    """The ``pct``-th percentile by linear interpolation between closest ranks (numpy's default method).

    Raises ``ValueError`` for an empty sequence or a percentile outside [0, 100].
    """
    if not values:
        raise ValueError("percentile of an empty sequence")
    if not 0.0 <= pct <= 100.0:
        raise ValueError(f"percentile {pct} outside [0, 100]")
    ordered = sorted(values)
    position = (len(ordered) - 1) * pct / 100.0
    low = math.floor(position)
    high = math.ceil(position)
    if low == high:
        return float(ordered[low])
    fraction = position - low
    return float(ordered[low] + (ordered[high] - ordered[low]) * fraction)


def summarize(values: Sequence[float], unit: str = "ms") -> dict[str, float | int | str]:
    """Count, mean, min, p50, p90, p99 and max of ``values``, with their unit."""
    if not values:
        return {"count": 0, "unit": unit}
    summary: dict[str, float | int | str] = {
        "count": len(values),
        "mean": sum(values) / len(values),
        "min": float(min(values)),
    }
    for pct in SUMMARY_PERCENTILES:
        summary[f"p{pct:g}"] = percentile(values, pct)
    summary["max"] = float(max(values))
    summary["unit"] = unit
    return summary


def paired_differences(first: Sequence[float], second: Sequence[float]) -> list[float]:
    """``second[i] - first[i]`` for each pair of interleaved measurements (the lists must be equally long)."""
    if len(first) != len(second):
        raise ValueError(f"unpaired samples: {len(first)} and {len(second)}")
    return [b - a for a, b in zip(first, second, strict=True)]


def rate(count: int, seconds: float) -> float:
    """Events per second; zero for a zero or negative duration."""
    return count / seconds if seconds > 0 else 0.0


def cores_used(cpu_seconds: float, wall_seconds: float) -> float:
    """CPU time over wall time: 1.0 is one core busy all the time."""
    return cpu_seconds / wall_seconds if wall_seconds > 0 else 0.0


def gaps_ms(arrivals: Sequence[float]) -> list[float]:
    """Milliseconds between successive arrival times given in seconds."""
    return [(later - earlier) * 1000.0 for earlier, later in itertools.pairwise(arrivals)]
