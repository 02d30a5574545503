"""Parsing vLLM's Prometheus ``/metrics`` page."""

from __future__ import annotations

import pytest

from provider.vllm import InvalidResponseError, parse_metrics
from tests.provider.conftest import TRANSCRIPTS_DIR

OLDER_SERVER = """\
# HELP vllm:num_requests_running Number of requests currently running on GPU.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{model_name="a"} 3.0
vllm:num_requests_running{model_name="b"} 1.0
vllm:num_requests_waiting{model_name="a"} 7.0
vllm:num_requests_waiting{model_name="b"} 0.0
vllm:gpu_cache_usage_perc{model_name="a"} 0.25
vllm:gpu_cache_usage_perc{model_name="b"} 0.5
vllm:prompt_tokens_total{model_name="a"} 1000.0
vllm:generation_tokens_total{model_name="a"} 2.5e+03
"""


def test_recorded_page() -> None:
    snapshot = parse_metrics((TRANSCRIPTS_DIR / "metrics.txt").read_text())
    assert snapshot.running == 0
    assert snapshot.waiting == 0
    assert snapshot.kv_cache_usage == 0.0
    assert snapshot.prompt_tokens_total == 119
    assert snapshot.generation_tokens_total == 52
    assert snapshot.models["tiny-llama"].prompt_tokens_total == 119


def test_older_gpu_cache_gauge_and_per_model_breakdown() -> None:
    snapshot = parse_metrics(OLDER_SERVER)
    assert (snapshot.running, snapshot.waiting) == (4, 7)
    assert snapshot.kv_cache_usage == 0.5
    assert snapshot.models["a"].kv_cache_usage == 0.25
    assert snapshot.models["a"].generation_tokens_total == 2500
    assert snapshot.models["b"].running == 1


def test_engines_are_summed_and_the_fullest_cache_counts() -> None:
    page = (
        'vllm:num_requests_running{engine="0",model_name="m"} 2\n'
        'vllm:num_requests_running{engine="1",model_name="m"} 3\n'
        'vllm:num_requests_waiting{engine="0",model_name="m"} 1\n'
        'vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.9\n'
        'vllm:kv_cache_usage_perc{engine="1",model_name="m"} 0.1\n'
    )
    snapshot = parse_metrics(page)
    assert snapshot.running == 5
    assert snapshot.kv_cache_usage == 0.9
    assert snapshot.models["m"].running == 5


def test_histogram_series_and_unrelated_lines_are_ignored() -> None:
    page = (
        "process_cpu_seconds_total 12.0\n"
        'vllm:time_to_first_token_seconds_bucket{le="0.1",model_name="m"} 9.0\n'
        'vllm:num_requests_running{model_name="m"} NaN\n'
        'vllm:num_requests_waiting{model_name="m"} 2\n'
    )
    snapshot = parse_metrics(page)
    assert (snapshot.running, snapshot.waiting) == (0, 2)
    assert snapshot.kv_cache_usage is None


def test_a_page_without_vllm_gauges_is_refused() -> None:
    with pytest.raises(InvalidResponseError):
        parse_metrics("process_cpu_seconds_total 12.0\n")


def test_snapshot_is_json_serializable() -> None:
    dumped = parse_metrics(OLDER_SERVER).model_dump(mode="json")
    assert dumped["models"]["a"]["waiting"] == 7
