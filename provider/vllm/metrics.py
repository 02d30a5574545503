"""Reading vLLM's Prometheus ``/metrics`` text into a ``MetricsSnapshot``.

Only the series the fleet paces by are read: running and waiting requests, KV-cache usage
(``kv_cache_usage_perc``, or ``gpu_cache_usage_perc`` on older servers, both 0..1) and the prompt and
generation token counters. Series are summed over engines; KV-cache usage takes the fullest engine.
"""

from __future__ import annotations

import math
import re

from provider.vllm.errors import InvalidResponseError
from provider.vllm.models import MetricsSnapshot, ModelMetrics

__all__ = ["parse_metrics"]

_RUNNING = "vllm:num_requests_running"
_WAITING = "vllm:num_requests_waiting"
_KV_CACHE_USAGE = ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc")
# Summed series, by the ``ModelMetrics`` field they fill.
_SUMMED = {
    _RUNNING: "running",
    _WAITING: "waiting",
    "vllm:prompt_tokens_total": "prompt_tokens_total",
    "vllm:generation_tokens_total": "generation_tokens_total",
}

_SAMPLE = re.compile(r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>.*)\})?\s+(?P<value>\S+)")
_MODEL_LABEL = re.compile(r'model_name="((?:[^"\\]|\\.)*)"')


class _Totals:
    """Sums (and the fullest KV cache) for one model, or for the whole server."""

    def __init__(self) -> None:
        self.sums = dict.fromkeys(_SUMMED.values(), 0.0)
        self.kv_cache_usage: float | None = None

    def add(self, series: str, value: float) -> None:
        if series in _KV_CACHE_USAGE:
            self.kv_cache_usage = value if self.kv_cache_usage is None else max(self.kv_cache_usage, value)
        else:
            self.sums[_SUMMED[series]] += value

    def metrics(self) -> ModelMetrics:
        return ModelMetrics(
            **{field: round(total) for field, total in self.sums.items()}, kv_cache_usage=self.kv_cache_usage
        )


def parse_metrics(text: str) -> MetricsSnapshot:
    """The load summary of one ``/metrics`` page; a page without vLLM's request gauges is refused."""
    server = _Totals()
    per_model: dict[str, _Totals] = {}
    seen_gauges = False
    for line in text.splitlines():
        if not line.startswith("vllm:"):
            continue
        match = _SAMPLE.match(line)
        if match is None or (match["name"] not in _SUMMED and match["name"] not in _KV_CACHE_USAGE):
            continue
        try:
            value = float(match["value"])
        except ValueError:
            continue
        if math.isnan(value):
            continue
        series = match["name"]
        server.add(series, value)
        label = _MODEL_LABEL.search(match["labels"] or "")
        if label is not None:
            per_model.setdefault(label.group(1), _Totals()).add(series, value)
        seen_gauges = seen_gauges or series in (_RUNNING, _WAITING)
    if not seen_gauges:
        raise InvalidResponseError("the /metrics page has no vllm:num_requests_running or _waiting series")
    return MetricsSnapshot(
        **server.metrics().model_dump(),
        models={name: totals.metrics() for name, totals in per_model.items()},
    )
