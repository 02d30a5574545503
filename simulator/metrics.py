"""Per-model load and the Prometheus text of ``GET /metrics``: vLLM's metric names, labels and buckets."""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable, Sequence

__all__ = ["FINISH_REASONS", "Histogram", "ModelLoad", "render_metrics"]

ENGINE_LABEL = "0"
FINISH_REASONS = ("stop", "length", "abort", "error", "repetition")
TTFT_BUCKETS_S = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)  # fmt: skip
LATENCY_BUCKETS_S = (
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
    480.0, 960.0, 1920.0, 7680.0,
)  # fmt: skip


class Histogram:
    """A cumulative Prometheus histogram."""

    __slots__ = ("bounds", "count", "counts", "total")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.count = 0
        self.total = 0.0

    def observe(self, value: float) -> None:
        """Record one observation."""
        self.counts[bisect_left(self.bounds, value)] += 1
        self.count += 1
        self.total += value

    def lines(self, name: str, labels: str) -> Iterable[str]:
        """The ``_bucket``, ``_count`` and ``_sum`` sample lines."""
        cumulative = 0
        for bound, count in zip(self.bounds, self.counts, strict=False):
            cumulative += count
            yield f'{name}_bucket{{engine="{ENGINE_LABEL}",le="{bound}",{labels}}} {float(cumulative)}'
        yield f'{name}_bucket{{engine="{ENGINE_LABEL}",le="+Inf",{labels}}} {float(self.count)}'
        yield f'{name}_count{{engine="{ENGINE_LABEL}",{labels}}} {float(self.count)}'
        yield f'{name}_sum{{engine="{ENGINE_LABEL}",{labels}}} {self.total}'


class ModelLoad:
    """The live load and the totals of one base model (one engine)."""

    __slots__ = (
        "e2e",
        "finished",
        "generation_tokens",
        "kv_tokens",
        "prompt_tokens",
        "queue_time",
        "running",
        "ttft",
        "waiting",
    )

    def __init__(self) -> None:
        self.running = 0
        self.waiting = 0
        self.kv_tokens = 0
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.finished = dict.fromkeys(FINISH_REASONS, 0)
        self.ttft = Histogram(TTFT_BUCKETS_S)
        self.e2e = Histogram(LATENCY_BUCKETS_S)
        self.queue_time = Histogram(LATENCY_BUCKETS_S)


def _family(name: str, kind: str, help_text: str, samples: Iterable[str]) -> list[str]:
    """One metric family: HELP, TYPE and its sample lines."""
    return [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", *samples]


def render_metrics(loads: dict[str, ModelLoad], kv_cache_tokens: int) -> str:
    """The Prometheus exposition text of every model's load."""
    items = sorted(loads.items())

    def labels(model: str) -> str:
        """The labels after ``engine``: the model name."""
        return f'model_name="{model}"'

    def gauge(model: str, value: float) -> str:
        """One sample with the engine and model labels."""
        return f'{{engine="{ENGINE_LABEL}",{labels(model)}}} {float(value)}'

    lines: list[str] = []
    lines += _family(
        "vllm:num_requests_running",
        "gauge",
        "Number of requests in model execution batches.",
        (f"vllm:num_requests_running{gauge(m, load.running)}" for m, load in items),
    )
    lines += _family(
        "vllm:num_requests_waiting",
        "gauge",
        "Number of requests waiting to be processed.",
        (f"vllm:num_requests_waiting{gauge(m, load.waiting)}" for m, load in items),
    )
    lines += _family(
        "vllm:kv_cache_usage_perc",
        "gauge",
        "KV-cache usage. 1 means 100 percent usage.",
        (f"vllm:kv_cache_usage_perc{gauge(m, min(1.0, load.kv_tokens / kv_cache_tokens))}" for m, load in items),
    )
    lines += _family(
        "vllm:prompt_tokens_total",
        "counter",
        "Number of prefill tokens processed.",
        (f"vllm:prompt_tokens_total{gauge(m, load.prompt_tokens)}" for m, load in items),
    )
    lines += _family(
        "vllm:generation_tokens_total",
        "counter",
        "Number of generation tokens processed.",
        (f"vllm:generation_tokens_total{gauge(m, load.generation_tokens)}" for m, load in items),
    )
    lines += _family(
        "vllm:request_success_total",
        "counter",
        "Count of successfully processed requests.",
        (
            f'vllm:request_success_total{{engine="{ENGINE_LABEL}",finished_reason="{reason}",{labels(m)}}} '
            f"{float(count)}"
            for m, load in items
            for reason, count in load.finished.items()
        ),
    )
    histograms = (
        ("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.", "ttft"),
        ("vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.", "e2e"),
        (
            "vllm:request_queue_time_seconds",
            "Histogram of time spent in WAITING phase for request.",
            "queue_time",
        ),
    )
    for name, help_text, attribute in histograms:
        samples = (line for m, load in items for line in getattr(load, attribute).lines(name, labels(m)))
        lines += _family(name, "histogram", help_text, samples)
    return "\n".join(lines) + "\n"
