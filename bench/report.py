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

# name, description, threshold, comparison ("<=" or ">="), unit
TARGETS: tuple[tuple[str, str, float, str, str], ...] = (
    ("overhead_p50", "fleet overhead p50 (fleet - direct, paired, Redis)", 3.0, "<=", "ms"),
    ("overhead_p99", "fleet overhead p99 (fleet - direct, paired, Redis)", 10.0, "<=", "ms"),
    ("throughput_ratio", "fleet/direct throughput at every N (Redis)", 0.9, ">=", "ratio"),
    ("added_ttft_p50", "added time to first token p50", 5.0, "<=", "ms"),
    ("relay_chunks", "chunks/s one worker relays", 10_000.0, ">=", "chunks/s"),
    ("eddsa_ratio", "EdDSA verify+open / bare Ed25519 verify", 0.8, ">=", "ratio"),
    ("hs256_sign", "HS256 sign+seal", 10_000.0, ">=", "ops/s"),
    ("hs256_verify", "HS256 verify+open", 10_000.0, ">=", "ops/s"),
)


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
    """Each target's measured value and where it comes from."""
    overhead = results.get("overhead", {}).get("redis", {})
    levels = results.get("throughput", {}).get("redis", {}).get("levels", {})
    ratios = {n: _get(level, "ratio") for n, level in levels.items()}
    worst = min(ratios.items(), key=lambda item: item[1]) if ratios else None
    codec = results.get("codec", {})
    return {
        "overhead_p50": (_get(overhead, "added_ms", "p50"), ""),
        "overhead_p99": (_get(overhead, "added_ms", "p99"), ""),
        "throughput_ratio": (worst[1], f"lowest at N={worst[0]}") if worst else (None, ""),
        "added_ttft_p50": (_get(results, "streaming", "added_ttft_ms", "p50"), ""),
        "relay_chunks": (_get(results, "relay", "fleet_chunks_per_s"), ""),
        "eddsa_ratio": (_get(codec, "eddsa_verify_ratio"), ""),
        "hs256_sign": (_get(codec, "hs256_sign_seal_per_s"), ""),
        "hs256_verify": (_get(codec, "hs256_verify_open_per_s"), ""),
    }


def evaluate_targets(results: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Every target with its threshold, the measured value and whether it is met (None: not measured)."""
    measured = _measured(results)
    rows: list[dict[str, Any]] = []
    for key, description, threshold, comparison, unit in TARGETS:
        value, note = measured[key]
        met: bool | None
        if value is None:
            met = None
        elif comparison == "<=":
            met = value <= threshold
        else:
            met = value >= threshold
        rows.append(
            {
                "name": key,
                "description": description,
                "target": f"{comparison} {threshold:g}",
                "value": value,
                "unit": unit,
                "met": met,
                "note": note,
            }
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


def _overhead_section(results: Mapping[str, Any]) -> list[str]:
    rows = []
    for broker, data in results.get("overhead", {}).items():
        cpu = data.get("cpu_per_request_ms", {})
        worker_cpu = _get(cpu, "worker")
        rows.append(
            [
                broker,
                fmt(data.get("pairs")),
                _pcts(data.get("direct_ms")),
                _pcts(data.get("fleet_ms")),
                _pcts(data.get("added_ms")),
                fmt(worker_cpu),
            ]
        )
    if not rows:
        return []
    header = [
        "broker",
        "pairs",
        "direct p50/p90/p99 ms",
        "fleet p50/p90/p99 ms",
        "added (paired) p50/p90/p99 ms",
        "worker CPU ms/request",
    ]
    return [
        "## 1. Overhead per request (zero-latency simulator, one request at a time)",
        "",
        "Direct and fleet requests interleaved; *added* is fleet - direct for each pair.",
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
            direct, fleet = level.get("direct", {}), level.get("fleet", {})
            rows.append(
                [
                    broker,
                    n,
                    fmt(_get(level, "worker_processes")) if level.get("worker_processes") else "1",
                    fmt(_get(level, "ideal_requests_per_s")),
                    fmt(_get(direct, "requests_per_s")),
                    fmt(_get(fleet, "requests_per_s")),
                    fmt(_get(level, "ratio")),
                    _pcts(fleet.get("latency_ms"), ("p50", "p99")),
                    _cores(direct.get("cpu_cores")),
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
        "fleet req/s",
        "fleet/direct",
        "fleet latency p50/p99 ms",
        "CPU cores, direct run",
        "CPU cores, fleet run",
    ]
    return [
        "## 2. Throughput (simulator: TTFT 100 ms, 20 ms/token, 16 tokens; closed-loop callers)",
        "",
        f"Each run lasts {fmt(window)} s; *ideal* is N / 0.4 s. CPU is cores busy over the run "
        "(machine = all processes; load = the load-generator processes; worker = all its processes). "
        "The worker is sized for N: N slots, and from N = 64 one process per core "
        "(`vllm-fleet worker --processes`), since one Python process runs below one core.",
        "",
        *_table(header, rows),
        "",
    ]


def _streaming_section(results: Mapping[str, Any]) -> list[str]:
    lines: list[str] = []
    streaming = results.get("streaming")
    if streaming and streaming.get("streams"):
        rows = [
            ["time to first token ms", _pcts(streaming.get("direct_ttft_ms")), _pcts(streaming.get("fleet_ttft_ms"))],
            [
                "gap between chunks ms",
                _pcts(streaming.get("direct_chunk_gap_ms")),
                _pcts(streaming.get("fleet_chunk_gap_ms")),
            ],
            ["added TTFT (paired) ms", "", _pcts(streaming.get("added_ttft_ms"))],
        ]
        lines += [
            f"## 3. Streaming ({streaming['streams']} streams each way; TTFT 100 ms, 20 ms/token)",
            "",
            *_table(["p50 / p90 / p99", "direct client", "fleet (open_stream)"], rows),
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


def _profile_section(report: Mapping[str, Any]) -> list[str]:
    profile = report.get("profile")
    if not profile:
        return []
    lines = [
        "## Profile",
        "",
        f"{profile.get('what', '')}; worker CPU per request: "
        f"{fmt(_get(profile, 'worker_cpu_per_request_ms'))} ms. Inclusive share of on-CPU samples, "
        "frames every stack has left out.",
        "",
    ]
    for who in ("worker", "producer"):
        data = profile.get(who) or {}
        if not data.get("top"):
            continue
        rows = [[f"{row['percent']:.1f}%", f"`{row['frame']}`"] for row in data["top"]]
        lines += [f"**{who}** ({fmt(data.get('samples'))} samples)", "", *_table(["share", "frame"], rows), ""]
    commands = profile.get("redis_commands")
    if commands and commands.get("by_process"):
        rows = [
            [who, fmt(commands["total_per_request"].get(who)), ", ".join(f"{cmd} {n:g}" for cmd, n in counts.items())]
            for who, counts in commands["by_process"].items()
        ]
        lines += [
            f"Redis commands per request ({commands.get('requests')} sequential chats, `redis-cli monitor`; "
            "db13 broker, db14 results, db15 state; MULTI/EXEC and pipelines are one round trip each):",
            "",
            *_table(["process", "commands", "by command"], rows),
            "",
        ]
    return lines


def _notes_section(report: Mapping[str, Any]) -> list[str]:
    notes = report.get("notes") or []
    if not notes:
        return []
    return ["## Notes", "", *[f"- {note}" for note in notes], ""]


def render_markdown(report: Mapping[str, Any]) -> str:
    """The whole ``docs/benchmarks.md`` from one benchmark JSON document."""
    results = report.get("results", {})
    sanity = report.get("sanity", {})
    lines = [
        "# Benchmarks",
        "",
        f"Generated by `python -m bench --mode {report.get('mode')}` on {report.get('finished_at')} "
        f"in {fmt(report.get('duration_s'), 0)} s, from `{report.get('results_file', 'bench/results/latest.json')}`. "
        "Do not edit by hand.",
        "",
        f"Sanity: {fmt(sanity.get('requests'))} requests checked, {fmt(sanity.get('failed'))} failed, "
        f"{fmt(sanity.get('wrong'))} wrong (every answer's content, completion tokens and finish reason).",
        "",
        "Everything runs on this one machine, on loopback: the simulator (`vllm-sim`), one Celery worker "
        "(`-P threads`), the load generators, Redis and RabbitMQ share its cores. *Direct* is the provider "
        "client straight to the same simulator, in the same run. Envelopes are signed (Ed25519) and encrypted "
        "(AES-256-GCM), the defaults. CPU figures are cores busy (1.00 = one core all the time); *other* is "
        "CPU used by processes outside the benchmark, which disturbs the figures when it is high.",
        "",
    ]
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
