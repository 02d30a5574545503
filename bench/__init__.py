"""The fleet's benchmark: ``python -m bench --mode quick|full``.

One run starts its own simulators, workers and load generators on loopback (Redis databases 13/14/15 and a
RabbitMQ vhost of its own), measures what the fleet adds to requests sent straight to the same simulator,
writes every figure with its unit to ``bench/results/latest.json`` and renders ``docs/benchmarks.md`` from it.
It exits non-zero when any request failed or any answer was wrong.
"""

from __future__ import annotations

__all__ = ["RESULTS_FILE", "TABLE_FILE"]

from pathlib import Path

_ROOT = Path(__file__).resolve().parents[1]
RESULTS_FILE = _ROOT / "bench" / "results" / "latest.json"
TABLE_FILE = _ROOT / "docs" / "benchmarks.md"
