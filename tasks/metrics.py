"""The workers' Prometheus metrics, served on a port per worker.

| metric | type | labels |
|---|---|---|
| ``vllm_fleet_requests_total`` | counter | lane, operation, outcome (``ok`` or the error code) |
| ``vllm_fleet_request_seconds`` | histogram | operation: time from the worker taking the message to its answer |
| ``vllm_fleet_time_to_first_token_seconds`` | histogram | lane: first streamed chunk relayed |
| ``vllm_fleet_tokens_total`` | counter | direction (``in``: prompt, ``out``: completion) |
| ``vllm_fleet_envelope_rejections_total`` | counter | code |
| ``vllm_fleet_undecodable_messages_total`` | counter | reason |
| ``vllm_fleet_retries_total`` | counter | operation |
| ``vllm_fleet_hand_backs_total`` | counter | instance |
| ``vllm_fleet_in_flight_requests`` | gauge | instance |
| ``vllm_fleet_circuit_open`` | gauge | instance: 0 closed, 1 half-open, 2 open |
| ``vllm_fleet_refused_stream_entries_total`` | counter | code: entries readers skipped (forged, duplicate) |
| ``vllm_fleet_refused_registry_records_total`` | counter | reason: registry records routers skipped |

``serve_metrics(port)`` starts the HTTP endpoint. Under prefork, set ``PROMETHEUS_MULTIPROC_DIR`` (as
prometheus_client documents): children write their samples there and the endpoint aggregates them.
"""

from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client import multiprocess as prometheus_multiprocess

__all__ = [
    "CIRCUIT_OPEN",
    "CIRCUIT_VALUES",
    "ENVELOPE_REJECTIONS",
    "FORGED_STREAM_ENTRIES",
    "HAND_BACKS",
    "IN_FLIGHT",
    "REFUSED_REGISTRY_RECORDS",
    "REQUESTS",
    "REQUEST_SECONDS",
    "RETRIES",
    "TIME_TO_FIRST_TOKEN",
    "TOKENS",
    "UNDECODABLE_MESSAGES",
    "serve_metrics",
]

_LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
_MULTIPROCESS = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))

ENVELOPE_REJECTIONS = Counter(
    "vllm_fleet_envelope_rejections_total", "Envelopes refused by workers, by error code", ["code"]
)
FORGED_STREAM_ENTRIES = Counter(
    "vllm_fleet_refused_stream_entries_total",
    "Stream entries readers skipped: not signed by a worker for the request, or repeated",
    ["code"],
)
REFUSED_REGISTRY_RECORDS = Counter(
    "vllm_fleet_refused_registry_records_total",
    "Registry records readers skipped: not JSON, not signed by a worker, or invalid",
    ["reason"],
)
UNDECODABLE_MESSAGES = Counter(
    "vllm_fleet_undecodable_messages_total",
    "Messages no task could be made of, dead-lettered by workers, by reason",
    ["reason"],
)
REQUESTS = Counter(
    "vllm_fleet_requests_total", "Requests served, by lane, operation and outcome", ["lane", "operation", "outcome"]
)
REQUEST_SECONDS = Histogram(
    "vllm_fleet_request_seconds", "Time to answer a request once taken", ["operation"], buckets=_LATENCY_BUCKETS_S
)
TIME_TO_FIRST_TOKEN = Histogram(
    "vllm_fleet_time_to_first_token_seconds", "Time to the first relayed chunk", ["lane"], buckets=_LATENCY_BUCKETS_S
)
TOKENS = Counter("vllm_fleet_tokens_total", "Tokens in (prompt) and out (completion)", ["direction"])
RETRIES = Counter("vllm_fleet_retries_total", "Retries of transient vLLM failures", ["operation"])
HAND_BACKS = Counter("vllm_fleet_hand_backs_total", "Requests handed back to their lane", ["instance"])
IN_FLIGHT = Gauge(
    "vllm_fleet_in_flight_requests", "Requests in flight per instance", ["instance"], multiprocess_mode="livesum"
)
CIRCUIT_OPEN = Gauge(
    "vllm_fleet_circuit_open",
    "Circuit state per instance (0 closed, 1 half-open, 2 open)",
    ["instance"],
    multiprocess_mode="max",
)
CIRCUIT_VALUES = {"closed": 0, "half_open": 1, "open": 2}


def serve_metrics(port: int, address: str = "0.0.0.0") -> None:
    """Serve /metrics for this worker (aggregating prefork children when multiprocess mode is on)."""
    if _MULTIPROCESS:
        registry = CollectorRegistry()
        prometheus_multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        start_http_server(port, addr=address, registry=registry)
    else:
        start_http_server(port, addr=address)
