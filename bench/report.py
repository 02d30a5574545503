"""The benchmark's report: machine facts, targets met or missed, and the Markdown table rendered from the JSON.

``render_markdown`` takes only the JSON document (``bench/results/latest.json``), so the table can be
regenerated from a saved run: ``python -m bench --render-only``.
"""

from __future__ import annotations

import os
import platform
import subprocess
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

__all__ = [
    "PACKAGES",
    "TARGETS",
    "evaluate_targets",
    "fmt",
    "machine_info",
    "render_markdown",
]

PACKAGES = (
    "celery",
    "kombu",
    "redis",
    "amqp",
    "httpx",
    "pydantic",
    "PyJWT",
    "cryptography",
    "uvicorn",
    "starlette",
    "vllm-celery-fleet",
)

# Absolute targets: name, description, threshold, comparison ("<=" or ">="), unit.
TARGETS: tuple[tuple[str, str, float, str, str], ...] = (
    ("overhead_p99", "fleet overhead p99 (fleet - direct, paired, Redis)", 10.0, "<=", "ms"),
    ("added_ttft_p50", "added time to first token p50", 5.0, "<=", "ms"),
    ("relay_chunks", "chunks/s one worker relays", 10_000.0, ">=", "chunks/s"),
    ("eddsa_ratio", "EdDSA verify+open / bare Ed25519 verify", 0.8, ">=", "ratio"),
    ("hs256_sign", "HS256 sign+seal", 10_000.0, ">=", "ops/s"),
    ("hs256_verify", "HS256 verify+open", 10_000.0, ">=", "ops/s"),
)
# The targets against the plain Celery task (issue 13), checked per broker in the same run.
OVERHEAD_P50_MS = 3.0
RATIO_TARGET = 0.9
RATIO_MAX_N = 64
PEER_LEVELS = (8, 64, 256)
CALLER_CPU_FACTOR = 1.5
BROKERS = ("redis", "rabbitmq")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def _redis_version(url: str) -> str:
    try:
        import redis

        client = redis.Redis.from_url(url, socket_timeout=2)
        version = str(client.info("server").get("redis_version", "unknown"))
        client.close()
        return version
    except Exception:
        return "unreachable"


def _rabbitmq_version() -> str:
    try:
        result = subprocess.run(
            ["rabbitmqctl", "-q", "version"], capture_output=True, text=True, timeout=30, check=False
        )
        return result.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unavailable"


def machine_info(redis_url: str) -> dict[str, Any]:
    """CPU model, cores, memory, OS, Python, package and server versions."""
    memory_gb = None
    try:
        import psutil

        memory_gb = round(psutil.virtual_memory().total / 1024**3, 1)
    except Exception:
        memory_gb = None
    return {
        "cpu_model": _cpu_model(),
        "cores": os.cpu_count(),
        "memory_gb": memory_gb,
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "packages": {name: _version(name) for name in PACKAGES},
        "redis_server": _redis_version(redis_url),
        "rabbitmq_server": _rabbitmq_version(),
    }


def _get(data: Mapping[str, Any], *path: str) -> Any:
    node: Any = data
    for key in path:
        if not isinstance(node, Mapping) or key not in node:
            return None
        node = node[key]
    if isinstance(node, Mapping) and "value" in node:
        return node["value"]
    return node


def _measured(results: Mapping[str, Any]) -> dict[str, tuple[float | None, str]]:
    """Each absolute target's measured value and where it comes from."""
    overhead = results.get("overhead", {}).get("redis", {})
    codec = results.get("codec", {})
    return {
        "overhead_p99": (_get(overhead, "added_ms", "p99"), ""),
        "added_ttft_p50": (_get(results, "streaming", "added_ttft_ms", "p50"), ""),
        "relay_chunks": (_get(results, "relay", "fleet_chunks_per_s"), ""),
        "eddsa_ratio": (_get(codec, "eddsa_verify_ratio"), ""),
        "hs256_sign": (_get(codec, "hs256_sign_seal_per_s"), ""),
        "hs256_verify": (_get(codec, "hs256_verify_open_per_s"), ""),
    }


def _row(
    name: str, description: str, target: str, value: float | None, unit: str, met: bool | None, note: str = ""
) -> dict[str, Any]:
    return {
        "name": name,
        "description": description,
        "target": target,
        "value": value,
        "unit": unit,
        "met": met,
        "note": note,
    }


def _compare(value: float | None, limit: float | None, comparison: str) -> bool | None:
    if value is None or limit is None:
        return None
    return value <= limit if comparison == "<=" else value >= limit


def _peer_rows(results: Mapping[str, Any], broker: str) -> list[dict[str, Any]]:
    """The issue-13 targets for one broker: the fleet against the plain Celery task measured beside it."""
    rows: list[dict[str, Any]] = []
    overhead = results.get("overhead", {}).get(broker)
    if overhead:
        fleet_cpu = _get(overhead, "worker_cpu_per_request_ms", "fleet")
        peer_cpu = _get(overhead, "worker_cpu_per_request_ms", "peer")
        rows.append(
            _row(
                f"worker_cpu[{broker}]",
                f"worker CPU per request, sequential ({broker})",
                f"<= peer's {fmt(peer_cpu)}",
                fleet_cpu,
                "ms",
                _compare(fleet_cpu, peer_cpu, "<="),
            )
        )
        for pct in ("p50", "p99"):
            fleet_added = _get(overhead, "added_ms", pct)
            peer_added = _get(overhead, "peer_added_ms", pct)
            rows.append(
                _row(
                    f"added_{pct}[{broker}]",
                    f"added latency {pct}, sequential ({broker})",
                    f"<= peer's {fmt(peer_added)}",
                    fleet_added,
                    "ms",
                    _compare(fleet_added, peer_added, "<="),
                )
            )
        added_p50 = _get(overhead, "added_ms", "p50")
        rows.append(
            _row(
                f"overhead_p50[{broker}]",
                f"fleet overhead p50 (fleet - direct, paired, {broker})",
                f"<= {OVERHEAD_P50_MS:g}",
                added_p50,
                "ms",
                _compare(added_p50, OVERHEAD_P50_MS, "<="),
            )
        )
        fleet_caller = _get(overhead, "caller_cpu_per_request_ms", "fleet")
        peer_caller = _get(overhead, "caller_cpu_per_request_ms", "peer")
        limit = peer_caller * CALLER_CPU_FACTOR if peer_caller is not None else None
        rows.append(
            _row(
                f"caller_cpu[{broker}]",
                f"caller CPU per request, sequential ({broker})",
                f"<= {CALLER_CPU_FACTOR:g} x peer's {fmt(peer_caller)} = {fmt(limit)}",
                fleet_caller,
                "ms",
                _compare(fleet_caller, limit, "<="),
            )
        )
    levels = results.get("throughput", {}).get(broker, {}).get("levels", {})
    for n in PEER_LEVELS:
        level = levels.get(str(n))
        if not level:
            continue
        fleet_rate = _get(level, "fleet", "requests_per_s")
        peer_rate = _get(level, "peer", "requests_per_s")
        rows.append(
            _row(
                f"throughput_vs_peer[{broker}, N={n}]",
                f"throughput at N = {n} ({broker})",
                f">= peer's {fmt(peer_rate)}",
                fleet_rate,
                "req/s",
                _compare(fleet_rate, peer_rate, ">="),
            )
        )
    ratios = {int(n): _get(level, "ratio") for n, level in levels.items() if int(n) <= RATIO_MAX_N}
    if ratios:
        worst_n, worst = min(ratios.items(), key=lambda item: item[1])
        rows.append(
            _row(
                f"throughput_ratio[{broker}]",
                f"fleet/direct throughput at N <= {RATIO_MAX_N} ({broker})",
                f">= {RATIO_TARGET:g}",
                worst,
                "ratio",
                _compare(worst, RATIO_TARGET, ">="),
                f"lowest at N={worst_n}",
            )
        )
    return rows


def evaluate_targets(results: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Every target with its threshold, the measured value and whether it is met (None: not measured): first
    the fleet against the plain Celery peer per broker, then the absolute ones."""
    rows = [row for broker in BROKERS for row in _peer_rows(results, broker)]
    measured = _measured(results)
    for key, description, threshold, comparison, unit in TARGETS:
        value, note = measured[key]
        rows.append(
            _row(
                key,
                description,
                f"{comparison} {threshold:g}",
                value,
                unit,
                _compare(value, threshold, comparison),
                note,
            )
        )
    return rows


def fmt(value: Any, digits: int = 2) -> str:
    """A number for the table: thousands separated, fixed decimals by size; ``—`` for nothing."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        if abs(value) >= 100:
            return f"{value:.1f}"
        return f"{value:.{digits}f}"
    return str(value)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def _pcts(summary: Any, keys: tuple[str, ...] = ("p50", "p90", "p99")) -> str:
    if not isinstance(summary, Mapping) or not summary.get("count"):
        return "—"
    return " / ".join(fmt(summary.get(key)) for key in keys)


def _cores(cpu: Any) -> str:
    if not isinstance(cpu, Mapping):
        return "—"
    order = ("machine", "load", "worker", "simulator", "redis", "rabbitmq", "other")
    return ", ".join(f"{name} {cpu[name]:.2f}" for name in order if cpu.get(name, 0.0) >= 0.005)


def _machine_section(report: Mapping[str, Any]) -> list[str]:
    machine = report.get("machine", {})
    packages = machine.get("packages", {})
    rows = [
        ["CPU", f"{machine.get('cpu_model')} ({machine.get('cores')} cores)"],
        ["memory", f"{machine.get('memory_gb')} GB"],
        ["OS", str(machine.get("os"))],
        ["Python", str(machine.get("python"))],
        ["Redis / RabbitMQ", f"{machine.get('redis_server')} / {machine.get('rabbitmq_server')}"],
        ["packages", ", ".join(f"{name} {version}" for name, version in packages.items())],
    ]
    return ["## Machine", "", *_table(["", ""], rows), ""]


def _targets_section(report: Mapping[str, Any]) -> list[str]:
    rows = []
    for row in report.get("targets", []):
        met = {True: "met", False: "**missed**", None: "not measured"}[row["met"]]
        measured = f"{fmt(row['value'])} {row['unit']}" if row["value"] is not None else "—"
        if row.get("note"):
            measured += f" ({row['note']})"
        rows.append([row["description"], f"{row['target']} {row['unit']}", measured, met])
    return ["## Targets", "", *_table(["target", "threshold", "measured", ""], rows), ""]


def _state(*states: bool | None) -> str:
    if any(state is False for state in states):
        return "**missed**"
    if states and all(state is True for state in states):
        return "met"
    return "not measured"


def _pair(first: Any, second: Any) -> str:
    return "—" if first is None and second is None else f"{fmt(first)} / {fmt(second)}"


def _rate_cell(level: Mapping[str, Any], kind: str) -> str:
    value = _get(level, kind, "requests_per_s")
    if value is None:
        return "—"
    if kind == "direct":
        return fmt(value)
    ratio = value / max(1e-9, _get(level, "direct", "requests_per_s") or 0.0)
    return f"{fmt(value)} ({ratio:.2f})"


def _peer_broker_rows(results: Mapping[str, Any], broker: str, targets: Mapping[str, bool | None]) -> list[list[str]]:
    rows: list[list[str]] = []
    overhead = results.get("overhead", {}).get(broker) or {}
    if overhead.get("pairs"):
        rows.append(
            [
                "added latency p50 / p99 ms (sequential, zero-latency simulator)",
                "—",
                _pair(_get(overhead, "peer_added_ms", "p50"), _get(overhead, "peer_added_ms", "p99")),
                _pair(_get(overhead, "added_ms", "p50"), _get(overhead, "added_ms", "p99")),
                f"≤ peer's; p50 ≤ {OVERHEAD_P50_MS:g} ms",
                _state(
                    targets.get(f"added_p50[{broker}]"),
                    targets.get(f"added_p99[{broker}]"),
                    targets.get(f"overhead_p50[{broker}]"),
                ),
            ]
        )
        rows.append(
            [
                "worker CPU ms per request (sequential)",
                "—",
                fmt(_get(overhead, "worker_cpu_per_request_ms", "peer")),
                fmt(_get(overhead, "worker_cpu_per_request_ms", "fleet")),
                "≤ peer's",
                _state(targets.get(f"worker_cpu[{broker}]")),
            ]
        )
        rows.append(
            [
                "caller CPU ms per request (sequential)",
                fmt(_get(overhead, "caller_cpu_per_request_ms", "direct")),
                fmt(_get(overhead, "caller_cpu_per_request_ms", "peer")),
                fmt(_get(overhead, "caller_cpu_per_request_ms", "fleet")),
                f"≤ {CALLER_CPU_FACTOR:g} x peer's",
                _state(targets.get(f"caller_cpu[{broker}]")),
            ]
        )
    levels = results.get("throughput", {}).get(broker, {}).get("levels", {})
    for n_text, level in levels.items():
        n = int(n_text)
        checks: list[bool | None] = []
        wanted: list[str] = []
        if n in PEER_LEVELS:
            wanted.append("≥ peer's")
            checks.append(targets.get(f"throughput_vs_peer[{broker}, N={n}]"))
        if n <= RATIO_MAX_N:
            wanted.append(f"≥ {RATIO_TARGET:g} x direct")
            checks.append(_compare(_get(level, "ratio"), RATIO_TARGET, ">="))
        rows.append(
            [
                f"throughput req/s (÷ direct), N = {n}",
                _rate_cell(level, "direct"),
                _rate_cell(level, "peer"),
                _rate_cell(level, "fleet"),
                ", ".join(wanted) or "—",
                _state(*checks) if checks else "—",
            ]
        )
    top = max(levels, key=int, default=None)
    if top is not None and int(top) > 1:
        level = levels[top]
        rows.append(
            [
                f"worker / caller CPU ms per request under load, N = {top}",
                _pair(None, _get(level, "direct", "cpu_per_request_ms", "caller")),
                _pair(
                    _get(level, "peer", "cpu_per_request_ms", "worker"),
                    _get(level, "peer", "cpu_per_request_ms", "caller"),
                ),
                _pair(
                    _get(level, "fleet", "cpu_per_request_ms", "worker"),
                    _get(level, "fleet", "cpu_per_request_ms", "caller"),
                ),
                "—",
                "—",
            ]
        )
    streaming = results.get("streaming") or {}
    if broker == "redis" and streaming.get("streams"):
        rows.append(
            [
                "added time to first token p50 / p99 ms (streaming)",
                "—",
                _pair(_get(streaming, "peer_added_ttft_ms", "p50"), _get(streaming, "peer_added_ttft_ms", "p99")),
                _pair(_get(streaming, "added_ttft_ms", "p50"), _get(streaming, "added_ttft_ms", "p99")),
                "p50 ≤ 5 ms",
                _state(targets.get("added_ttft_p50")),
            ]
        )
    return rows


def _peer_section(report: Mapping[str, Any]) -> list[str]:
    """The lead table: the fleet beside the plain Celery task and direct calls, per broker, each target marked."""
    results = report.get("results", {})
    targets = {row["name"]: row["met"] for row in report.get("targets", [])}
    lines = [
        "## Fleet vs the plain Celery task vs direct",
        "",
        "*Plain Celery task* (the peer, [`bench/peer.py`](../bench/peer.py)) is what a user would write instead of "
        'the fleet: `@app.task def chat(body): return vllm.post("/v1/chat/completions", json=body).json()` with '
        "stock Celery (JSON, the stock Redis result backend, early acks; one shared `httpx.Client`), no envelopes, "
        "no ledger. Its streaming twin XADDs each server-sent event to a Redis stream the caller reads with "
        "`XREAD BLOCK`. Same broker, same pool (threads), same slots and worker processes, same load generator, "
        "same simulator, in the same run. *Direct* is the provider client straight to the simulator. Throughput "
        "cells show req/s and, in brackets, the share of direct's (requests completed in the window: one round of N "
        "requests is the resolution, about 4 % at N = 8 in 10 s; the JSON also has N / mean latency); the fleet's "
        "targets are checked against the peer's figures beside them.",
        "",
    ]
    for broker in BROKERS:
        rows = _peer_broker_rows(results, broker, targets)
        if not rows:
            continue
        title = {"redis": "Redis broker", "rabbitmq": "RabbitMQ broker (results in Redis)"}[broker]
        header = ["figure", "direct", "plain Celery task", "fleet", "fleet target", ""]
        lines += [f"### {title}", "", *_table(header, rows), ""]
    return lines


def _limits_section(report: Mapping[str, Any]) -> list[str]:
    """What limits the highest N: cores busy per process in each run, from the JSON."""
    results = report.get("results", {})
    cores = int(report.get("machine", {}).get("cores") or 1)
    lines: list[str] = []
    for broker, data in results.get("throughput", {}).items():
        levels = data.get("levels", {})
        top = max(levels, key=int, default=None)
        if top is None:
            continue
        level = levels[top]
        rows = []
        sentences = []
        for kind in ("direct", "peer", "fleet"):
            run = level.get(kind)
            if not run:
                continue
            cpu = run.get("cpu_cores", {})
            per_process = (run.get("worker_process_cores") or {}).get("value") or []
            rows.append(
                [
                    kind,
                    fmt(_get(run, "requests_per_s")),
                    f"{cpu.get('machine', 0.0):.2f}",
                    f"{cpu.get('load', 0.0):.2f} ({run.get('load_processes', '?')} processes)",
                    f"{cpu.get('worker', 0.0):.2f}"
                    + (f" ({' + '.join(f'{v:.2f}' for v in per_process)})" if per_process else ""),
                    f"{cpu.get('simulator', 0.0):.2f}",
                    f"{cpu.get('redis', 0.0):.2f}",
                    f"{cpu.get('rabbitmq', 0.0):.2f}",
                    f"{cpu.get('other', 0.0):.2f}",
                    fmt(_get(run, "cpu_per_request_ms", "worker")) if kind != "direct" else "—",
                    fmt(_get(run, "cpu_per_request_ms", "caller")),
                ]
            )
            if kind != "direct":
                busy = cpu.get("machine", 0.0)
                worker_ms = _get(run, "cpu_per_request_ms", "worker") or 0.0
                caller_ms = _get(run, "cpu_per_request_ms", "caller") or 0.0
                rate_value = _get(run, "requests_per_s") or 0.0
                sentences.append(
                    f"{kind}: {busy:.2f} of {cores} cores busy"
                    + (" (the machine is the limit)" if busy >= 0.9 * cores else "")
                    + f"; each request costs {worker_ms:.2f} ms in the worker and {caller_ms:.2f} ms in the caller, "
                    f"so at {fmt(rate_value)} req/s those two alone keep "
                    f"{(worker_ms + caller_ms) * rate_value / 1000.0:.2f} cores busy"
                )
        header = [
            "run",
            "req/s",
            "machine cores",
            "load generators",
            "worker (per process)",
            "simulator",
            "Redis",
            "RabbitMQ",
            "other",
            "worker CPU ms/req",
            "caller CPU ms/req",
        ]
        ideal = _get(level, "ideal_requests_per_s")
        lines += [
            f"### {broker}, N = {top} (ideal {fmt(ideal)} req/s)",
            "",
            *_table(header, rows),
            "",
            *[f"- {sentence}." for sentence in sentences],
            "",
        ]
    if not lines:
        return []
    return [
        f"## What limits the highest N on {cores} cores",
        "",
        "Cores busy per process over each run (1.00 = one core all the time). Everything shares the machine: at "
        "the highest N the load generators, the simulator, Redis/RabbitMQ and the worker compete for the same "
        "cores, so the req/s any Celery worker reaches is about the cores left for it divided by its CPU per "
        "request (worker and caller together). A worker process runs Python on one core at a time (the GIL).",
        "",
        *lines,
    ]


def _overhead_section(results: Mapping[str, Any]) -> list[str]:
    rows = []
    for broker, data in results.get("overhead", {}).items():
        rows.append(
            [
                broker,
                fmt(data.get("pairs")),
                _pcts(data.get("direct_ms")),
                _pcts(data.get("peer_ms")),
                _pcts(data.get("fleet_ms")),
                _pcts(data.get("peer_added_ms")),
                _pcts(data.get("added_ms")),
                _pair(
                    _get(data, "worker_cpu_per_request_ms", "peer"), _get(data, "worker_cpu_per_request_ms", "fleet")
                ),
            ]
        )
    if not rows:
        return []
    header = [
        "broker",
        "rounds",
        "direct p50/p90/p99 ms",
        "peer p50/p90/p99 ms",
        "fleet p50/p90/p99 ms",
        "peer added p50/p90/p99 ms",
        "fleet added p50/p90/p99 ms",
        "worker CPU ms/request peer / fleet",
    ]
    return [
        "## 1. Overhead per request (zero-latency simulator, one request at a time)",
        "",
        "Direct, peer and fleet requests interleaved (peer and fleet in alternating order); *added* is X - direct "
        "for each round.",
        "",
        *_table(header, rows),
        "",
    ]


def _throughput_section(results: Mapping[str, Any]) -> list[str]:
    rows = []
    window = None
    for broker, data in results.get("throughput", {}).items():
        window = data.get("window_s", window)
        for n, level in data.get("levels", {}).items():
            direct, peer, fleet = level.get("direct", {}), level.get("peer", {}), level.get("fleet", {})
            rows.append(
                [
                    broker,
                    n,
                    fmt(_get(level, "worker_processes")) if level.get("worker_processes") else "1",
                    fmt(_get(level, "ideal_requests_per_s")),
                    fmt(_get(direct, "requests_per_s")),
                    fmt(_get(peer, "requests_per_s")),
                    fmt(_get(fleet, "requests_per_s")),
                    fmt(_get(level, "ratio")),
                    _pcts(peer.get("latency_ms"), ("p50", "p99")),
                    _pcts(fleet.get("latency_ms"), ("p50", "p99")),
                    _pair(_get(peer, "cpu_per_request_ms", "worker"), _get(peer, "cpu_per_request_ms", "caller")),
                    _pair(_get(fleet, "cpu_per_request_ms", "worker"), _get(fleet, "cpu_per_request_ms", "caller")),
                    _cores(direct.get("cpu_cores")),
                    _cores(peer.get("cpu_cores")),
                    _cores(fleet.get("cpu_cores")),
                ]
            )
    if not rows:
        return []
    header = [
        "broker",
        "N",
        "worker processes",
        "ideal req/s",
        "direct req/s",
        "peer req/s",
        "fleet req/s",
        "fleet/direct",
        "peer latency p50/p99 ms",
        "fleet latency p50/p99 ms",
        "peer worker / caller CPU ms/req",
        "fleet worker / caller CPU ms/req",
        "CPU cores, direct run",
        "CPU cores, peer run",
        "CPU cores, fleet run",
    ]
    return [
        "## 2. Throughput (simulator: TTFT 100 ms, 20 ms/token, 16 tokens; closed-loop callers)",
        "",
        f"Each run lasts {fmt(window)} s; *ideal* is N / 0.4 s. CPU is cores busy over the run "
        "(machine = all processes; load = the load-generator processes; worker = all its processes). "
        "The fleet's and the peer's workers are sized alike for N: N slots over the processes "
        "`vllm-fleet worker` starts by default for an instance of concurrency N on this machine (one per 32 "
        "slots, at most one per core), since one Python process runs below one core.",
        "",
        *_table(header, rows),
        "",
    ]


def _streaming_section(results: Mapping[str, Any]) -> list[str]:
    lines: list[str] = []
    streaming = results.get("streaming")
    if streaming and streaming.get("streams"):
        rows = [
            [
                "time to first token ms",
                _pcts(streaming.get("direct_ttft_ms")),
                _pcts(streaming.get("peer_ttft_ms")),
                _pcts(streaming.get("fleet_ttft_ms")),
            ],
            [
                "gap between chunks ms",
                _pcts(streaming.get("direct_chunk_gap_ms")),
                _pcts(streaming.get("peer_chunk_gap_ms")),
                _pcts(streaming.get("fleet_chunk_gap_ms")),
            ],
            [
                "added TTFT (paired) ms",
                "",
                _pcts(streaming.get("peer_added_ttft_ms")),
                _pcts(streaming.get("added_ttft_ms")),
            ],
        ]
        lines += [
            f"## 3. Streaming ({streaming['streams']} streams each way; TTFT 100 ms, 20 ms/token)",
            "",
            *_table(["p50 / p90 / p99", "direct client", "peer (XADD/XREAD)", "fleet (open_stream)"], rows),
            "",
        ]
    relay = results.get("relay")
    if relay:
        rows = [
            [
                fmt(relay.get("tokens")),
                fmt(_get(relay, "direct_chunks_per_s")),
                fmt(_get(relay, "fleet_chunks_per_s")),
                _cores(relay.get("cpu_cores")),
            ]
        ]
        lines += [
            "Relay rate: one long stream, zero inter-token latency, read at the producer.",
            "",
            *_table(["tokens", "direct chunks/s", "fleet chunks/s", "CPU cores during fleet stream"], rows),
            "",
        ]
    return lines


def _codec_section(results: Mapping[str, Any]) -> list[str]:
    codec = results.get("codec")
    if not codec:
        return []
    rows = [[name, fmt(_get(codec, name)), str(codec[name].get("unit", ""))] for name in codec]
    return ["## 4. Envelope cost (`bench_codec`)", "", *_table(["figure", "value", "unit"], rows), ""]


def _lanes_section(results: Mapping[str, Any]) -> list[str]:
    lanes = results.get("lanes")
    if not lanes:
        return []
    rows = [
        [
            count,
            _pcts(data.get("fleet_ms")),
            _pcts(data.get("added_ms")),
            fmt(_get(data, "worker_rss_idle_mb")),
            fmt(_get(data, "worker_rss_mb")),
            fmt(_get(data, "worker_ready_s")),
            fmt(_get(data, "worker_idle_cores")),
            fmt(_get(data, "redis_idle_cores")),
        ]
        for count, data in lanes.items()
    ]
    header = [
        "lanes",
        "fleet p50/p90/p99 ms",
        "added p50/p90/p99 ms",
        "worker RSS idle MB",
        "worker RSS after MB",
        "worker ready s",
        "idle worker cores",
        "idle Redis cores",
    ]
    return ["## 6a. Lanes per worker (Redis broker)", "", *_table(header, rows), ""]


def _backlog_section(results: Mapping[str, Any]) -> list[str]:
    backlog = results.get("backlog")
    if not backlog:
        return []
    rows = [
        [
            fmt(backlog.get("tasks")),
            fmt(_get(backlog, "publish_per_s")),
            fmt(backlog.get("worker_concurrency")),
            fmt(_get(backlog, "drain_per_s")),
            fmt(_get(backlog, "drain_s")),
            fmt(_get(backlog, "worker_cores_during_drain")),
            fmt(_get(backlog, "worker_rss_at_first_result_mb")),
            fmt(_get(backlog, "worker_rss_peak_mb")),
            fmt(_get(backlog, "worker_rss_after_mb")),
            fmt(backlog.get("results_checked")),
        ]
    ]
    header = [
        "queued tasks",
        "publish tasks/s",
        "worker -c",
        "drain tasks/s",
        "drain s",
        "worker cores while draining",
        "worker RSS at first result MB",
        "peak MB",
        "after MB",
        "results checked",
    ]
    return [
        "## 6b. Backlog (Redis broker, zero-latency simulator)",
        "",
        "Signed envelopes published to the lane while no worker runs, then one worker started.",
        "",
        *_table(header, rows),
        "",
    ]


def area_costs(profile: Mapping[str, Any]) -> dict[str, float]:
    """Worker CPU ms per request in each area: its share of on-CPU samples times the CPU per request."""
    cpu = _get(profile, "worker_cpu_per_request_ms")
    shares = (profile.get("worker_areas") or {}).get("shares") or {}
    if cpu is None:
        return {}
    return {area: share / 100.0 * cpu for area, share in shares.items()}


def _share(share: float | None, cost: float | None) -> str:
    return "—" if share is None else f"{share:.1f}% ({fmt(cost)})"


def _profile_section(report: Mapping[str, Any]) -> list[str]:
    profile = report.get("profile")
    if not profile:
        return []
    peer = profile.get("peer") or {}
    lines = [
        "## Profile: where the worker's CPU goes, fleet vs the plain Celery task",
        "",
        f"{profile.get('what', '')}. Shares are of on-CPU samples (relative, so valid on a loaded machine); "
        "the area is the package of the innermost frame (time in a system call counts where it was made).",
        "",
    ]
    rows = [
        [
            "requests sampled",
            fmt(profile.get("requests")),
            fmt(peer.get("requests")),
        ],
        [
            "worker CPU ms per request",
            fmt(_get(profile, "worker_cpu_per_request_ms")),
            fmt(_get(peer, "worker_cpu_per_request_ms")),
        ],
    ]
    fleet_commands = profile.get("redis_commands") or {}
    peer_commands = peer.get("redis_commands") or {}
    for who in ("worker", "producer"):
        rows.append(
            [
                f"Redis commands per request, {who}",
                fmt((fleet_commands.get("total_per_request") or {}).get(who)),
                fmt((peer_commands.get("total_per_request") or {}).get(who)),
            ]
        )
    fleet_ms = area_costs(profile)
    peer_ms = area_costs(peer)
    fleet_areas = (profile.get("worker_areas") or {}).get("shares") or {}
    peer_areas = (peer.get("worker_areas") or {}).get("shares") or {}
    for area in dict.fromkeys([*fleet_areas, *peer_areas]):
        rows.append(
            [
                f"worker: {area}, share (ms per request)",
                _share(fleet_areas.get(area), fleet_ms.get(area)),
                _share(peer_areas.get(area), peer_ms.get(area)),
            ]
        )
    lines += [*_table(["", "fleet", "plain Celery task"], rows), ""]
    differences = sorted(
        ((area, fleet_ms.get(area, 0.0) - peer_ms.get(area, 0.0)) for area in dict.fromkeys([*fleet_ms, *peer_ms])),
        key=lambda item: -item[1],
    )
    extra = [f"{area} {delta:+.2f} ms" for area, delta in differences if abs(delta) >= 0.05]
    if fleet_ms and peer_ms and extra:
        total = sum(fleet_ms.values()) - sum(peer_ms.values())
        lines += [
            f"Per request the fleet's worker spends {total:+.2f} ms of CPU against the peer's, by area: "
            + ", ".join(extra)
            + ".",
            "",
        ]
    for label, commands in (("fleet", fleet_commands), ("plain Celery task", peer_commands)):
        if not commands.get("by_process"):
            continue
        command_rows = [
            [who, fmt(commands["total_per_request"].get(who)), ", ".join(f"{cmd} {n:g}" for cmd, n in counts.items())]
            for who, counts in commands["by_process"].items()
        ]
        lines += [
            f"Redis commands per request, {label} ({commands.get('requests')} sequential chats, `redis-cli monitor`; "
            f"{_databases_text(commands)}; MULTI/EXEC and pipelines are one round trip each):",
            "",
            *_table(["process", "commands", "by command"], command_rows),
            "",
        ]
    for title, data in (("fleet worker", profile.get("worker")), ("fleet caller", profile.get("producer"))):
        data = data or {}
        if not data.get("top"):
            continue
        top_rows = [[f"{row['percent']:.1f}%", f"`{row['frame']}`"] for row in data["top"]]
        lines += [
            f"**{title}**, inclusive share of on-CPU samples, frames every stack has left out "
            f"({fmt(data.get('samples'))} samples)",
            "",
            *_table(["share", "frame"], top_rows),
            "",
        ]
    return lines


def _databases_text(commands: Mapping[str, Any]) -> str:
    databases = commands.get("databases") or {"broker": 13, "results": 14, "state": 15}
    return ", ".join(f"db{number} {role}" for role, number in databases.items())


def _notes_section(report: Mapping[str, Any]) -> list[str]:
    notes = report.get("notes") or []
    if not notes:
        return []
    return ["## Notes", "", *[f"- {note}" for note in notes], ""]


def _peer_sanity(peer: Mapping[str, Any] | None) -> str:
    """The sanity line's tail for the plain Celery peer's own requests (counted apart: they never fail a run)."""
    if not peer:
        return "."
    return (
        f"; the plain Celery peer, counted apart (its failures are reported, they do not fail the run): "
        f"{fmt(peer.get('requests'))} requests, {fmt(peer.get('failed'))} failed, {fmt(peer.get('wrong'))} wrong."
    )


def render_markdown(report: Mapping[str, Any], findings: str = "") -> str:
    """The whole ``docs/benchmarks.md`` from one benchmark JSON document (and ``findings``, the hand-written
    notes of ``bench/findings.md``, placed after what limits the highest N)."""
    results = report.get("results", {})
    sanity = report.get("sanity", {})
    lines = [
        "# Benchmarks",
        "",
        f"Generated by `python -m bench --mode {report.get('mode')}` on {report.get('finished_at')} "
        f"in {fmt(report.get('duration_s'), 0)} s, from `{report.get('results_file', 'bench/results/latest.json')}`. "
        "Do not edit by hand.",
        "",
        "`make bench` (a full run, about 15 minutes on 2 cores) rewrites this file and "
        "`bench/results/latest.json`; `make bench-quick` (CI's, about 4 minutes) writes `.run/bench/quick.md` "
        "instead. `VFT_BENCH_DBS=a,b,c` moves the three Redis databases a run flushes (default 13,14,15).",
        "",
        f"Sanity: {fmt(sanity.get('requests'))} requests checked, {fmt(sanity.get('failed'))} failed, "
        f"{fmt(sanity.get('wrong'))} wrong (every answer's content, completion tokens and finish reason)"
        + _peer_sanity(sanity.get("peer")),
        "",
        "Everything runs on this one machine, on loopback: the simulator (`vllm-sim`), the Celery workers "
        "(`-P threads`; the fleet's, or the plain Celery task's), the load generators, Redis and RabbitMQ share "
        "its cores. *Direct* is the provider client straight to the same simulator, in the same run. Envelopes "
        "are signed (Ed25519) and encrypted (AES-256-GCM), the defaults. CPU figures are cores busy (1.00 = one "
        "core all the time); *other* is CPU used by processes outside the benchmark, which disturbs the figures "
        "when it is high.",
        "",
    ]
    lines += _peer_section(report)
    lines += _limits_section(report)
    if findings.strip():
        lines += [findings.strip(), ""]
    lines += _machine_section(report)
    lines += _targets_section(report)
    lines += _overhead_section(results)
    lines += _throughput_section(results)
    lines += _streaming_section(results)
    lines += _codec_section(results)
    lines += _lanes_section(results)
    lines += _backlog_section(results)
    lines += _profile_section(report)
    lines += _notes_section(report)
    return "\n".join(lines).rstrip() + "\n"
