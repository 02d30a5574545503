"""The fleet's benchmark: ``python -m bench --mode quick|full``.

One run starts its own simulators, workers and load generators on loopback (Redis databases 13/14/15, or those
named by ``VFT_BENCH_DBS``, and a RabbitMQ vhost of its own) and measures the fleet beside requests sent straight
to the same simulator and beside the plain Celery task a user would write instead (``bench.peer``). A full run
writes every figure with its unit to ``bench/results/latest.json`` and renders ``docs/benchmarks.md`` from it; a
quick run (CI) writes ``.run/bench/quick.json`` and ``.run/bench/quick.md``, outside the committed files.
It exits non-zero when any request failed or any answer was wrong.
"""

from __future__ import annotations

__all__ = ["FINDINGS_FILE", "QUICK_RESULTS_FILE", "QUICK_TABLE_FILE", "RESULTS_FILE", "TABLE_FILE"]

from pathlib import Path

_ROOT = Path(__file__).resolve().parents[1]
RESULTS_FILE = _ROOT / "bench" / "results" / "latest.json"
TABLE_FILE = _ROOT / "docs" / "benchmarks.md"
FINDINGS_FILE = _ROOT / "bench" / "findings.md"
QUICK_RESULTS_FILE = _ROOT / ".run" / "bench" / "quick.json"
QUICK_TABLE_FILE = _ROOT / ".run" / "bench" / "quick.md"
