"""``python -m bench --mode quick|full``: run every measurement, write the JSON and the Markdown table.

A full run writes ``bench/results/latest.json`` and ``docs/benchmarks.md`` (the committed report); a quick run
(CI's) writes ``.run/bench/quick.json`` and ``.run/bench/quick.md`` unless ``--results``/``--table`` say
otherwise. Exits 0 only when every request succeeded with the right answer (targets missed do not fail the run:
they are reported). ``--render-only`` re-renders ``docs/benchmarks.md`` from ``bench/results/latest.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import sys
import time
import traceback
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import FINDINGS_FILE, QUICK_RESULTS_FILE, QUICK_TABLE_FILE, RESULTS_FILE, TABLE_FILE
from bench.fleet import BACKEND_DB, BROKER_DB, REDIS_BASE, STATE_DB, VHOST
from bench.procs import flush_redis, install_signal_handlers, rabbit_vhost, stop_all
from bench.profile import profile_worker
from bench.report import evaluate_targets, machine_info, render_markdown
from bench.scenarios import (
    Sanity,
    measure_backlog,
    measure_codec,
    measure_lanes,
    measure_overhead,
    measure_relay,
    measure_streaming,
    measure_throughput,
)

MODES: dict[str, dict[str, Any]] = {
    "quick": {
        "codec_seconds": 1.5,
        "codec_rounds": 3,
        "overhead_requests": 300,
        "levels": [8, 64],
        "window_s": 3.0,
        "rabbit_overhead_requests": 150,
        "rabbit_levels": [8, 64],
        "streams": 10,
        "relay_tokens": 20_000,
        "lane_counts": [1, 10, 100],
        "lane_requests": 100,
        "backlog_tasks": 2_000,
        "backlog_concurrency": 64,
        "profile_s": 4.0,
    },
    "full": {
        "codec_seconds": 5.0,
        "codec_rounds": 5,
        "overhead_requests": 1000,
        "levels": [1, 8, 64, 256],
        "window_s": 10.0,
        "rabbit_overhead_requests": 1000,
        "rabbit_levels": [1, 8, 64, 256],
        "streams": 50,
        "relay_tokens": 50_000,
        "lane_counts": [1, 10, 100],
        "lane_requests": 300,
        "backlog_tasks": 10_000,
        "backlog_concurrency": 64,
        "profile_s": 8.0,
    },
}
SATURATED_FRACTION = 0.9
WORKER_LIMIT_CORES = 0.65
RATIO_TARGET = 0.9


def _reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


def _step(name: str, timings: dict[str, float], run: Callable[[], Any]) -> Any:
    print(f"[bench] {name} ...", file=sys.stderr, flush=True)
    started = time.monotonic()
    try:
        return run()
    finally:
        timings[name] = round(time.monotonic() - started, 1)
        print(f"[bench] {name} done in {timings[name]} s", file=sys.stderr, flush=True)


def saturation_notes(results: dict[str, Any], cores: int) -> tuple[list[str], dict[str, Any]]:
    """Where the machine's cores were the limit, and the ratio at the highest N where they were not."""
    notes: list[str] = []
    summary: dict[str, Any] = {}
    for broker, data in results.get("throughput", {}).items():
        best: tuple[int, float] | None = None
        for n_text, level in data.get("levels", {}).items():
            n = int(n_text)
            fleet_cpu = level["fleet"]["cpu_cores"]
            direct_cpu = level["direct"]["cpu_cores"]
            busy = fleet_cpu.get("machine", 0.0)
            ratio = level["ratio"]["value"]
            load_max = level["fleet"]["load_process_max_cores"]["value"]
            if busy >= SATURATED_FRACTION * cores:
                notes.append(
                    f"{broker}, N={n}: the machine is the limit in the fleet run ({busy:.2f} of {cores} cores "
                    f"busy: load generators {fleet_cpu.get('load', 0):.2f}, worker {fleet_cpu.get('worker', 0):.2f}, "
                    f"simulator {fleet_cpu.get('simulator', 0):.2f}, broker/backend "
                    f"{fleet_cpu.get('redis', 0) + fleet_cpu.get('rabbitmq', 0):.2f}); "
                    f"fleet/direct {ratio:.2f}"
                )
            elif best is None or n > best[0]:
                best = (n, ratio)
            if direct_cpu.get("machine", 0.0) >= SATURATED_FRACTION * cores:
                notes.append(f"{broker}, N={n}: the machine is also the limit in the direct run")
            other = max(fleet_cpu.get("other", 0.0), direct_cpu.get("other", 0.0))
            if other >= 0.25:
                notes.append(
                    f"{broker}, N={n}: processes outside the benchmark used up to {other:.2f} cores during the "
                    "runs: these figures are disturbed"
                )
            worker_cores = fleet_cpu.get("worker", 0.0)
            processes = int((level.get("worker_processes") or {}).get("value", 1))
            if worker_cores >= WORKER_LIMIT_CORES * processes:
                notes.append(
                    f"{broker}, N={n}: the worker is the limit: its {processes} process(es) used {worker_cores:.2f} "
                    f"cores, close to the {processes} core(s) their interpreters can use (one each: the GIL); "
                    "its CPU per request sets the rate"
                )
            elif busy < SATURATED_FRACTION * cores and ratio < RATIO_TARGET:
                notes.append(
                    f"{broker}, N={n}: no single limit: the worker's {processes} process(es) used {worker_cores:.2f} "
                    f"cores and the machine {busy:.2f} of {cores}; the worker's CPU per request, shared with the "
                    f"load generators and the simulator, sets the latency (fleet/direct {ratio:.2f})"
                )
            if load_max >= 0.8:
                notes.append(
                    f"{broker}, N={n}: one load-generator process used {load_max:.2f} cores: it may limit the load"
                )
        if best is not None:
            summary[broker] = {"highest_unsaturated_n": best[0], "ratio": {"value": best[1], "unit": "fleet/direct"}}
            notes.append(
                f"{broker}: highest N where the machine is not the limit: N={best[0]}, fleet/direct {best[1]:.2f}"
            )
    return notes, summary


def peer_notes(sanity: Sanity) -> list[str]:
    """The plain Celery peer's failed or wrong requests, as a finding (they do not fail the run)."""
    peer = sanity.peer
    if peer is None or not (peer.failed or peer.wrong):
        return []
    shown = "; ".join(peer.problems[:3])
    return [
        f"the plain Celery peer failed {peer.failed} and answered {peer.wrong} wrongly of its {peer.requests} "
        f"requests (a finding about the twenty-line task, not a failure of this run): {shown}"
    ]


def run(mode: str, *, profile: bool) -> dict[str, Any]:
    """Every measurement of one mode; the report document (also when a step failed)."""
    plan = MODES[mode]
    sanity = Sanity()
    results: dict[str, Any] = {"overhead": {}, "throughput": {}}
    timings: dict[str, float] = {}
    errors: list[str] = []
    notes: list[str] = []
    profile_data: dict[str, Any] | None = None
    started = time.time()
    machine = machine_info(f"{REDIS_BASE}/{STATE_DB}")
    redis_url = f"{REDIS_BASE}/{BROKER_DB}"
    databases = (BROKER_DB, BACKEND_DB, STATE_DB)
    in_ci = os.environ.get("CI", "").lower() in ("1", "true", "yes")
    try:
        flush_redis(REDIS_BASE, databases)
        results["codec"] = _step("codec", timings, lambda: measure_codec(plan["codec_seconds"], plan["codec_rounds"]))
        results["overhead"]["redis"] = _step(
            "overhead redis",
            timings,
            lambda: measure_overhead(redis_url, plan["overhead_requests"], sanity, label="redis"),
        )
        if profile:
            profile_data = _step("profile", timings, lambda: profile_worker(redis_url, plan["profile_s"], sanity))
        results["throughput"]["redis"] = _step(
            "throughput redis",
            timings,
            lambda: measure_throughput(redis_url, plan["levels"], plan["window_s"], sanity, label="redis"),
        )
        results["streaming"] = _step(
            "streaming", timings, lambda: measure_streaming(redis_url, plan["streams"], sanity)
        )
        results["relay"] = _step("relay", timings, lambda: measure_relay(redis_url, plan["relay_tokens"], sanity))
        if _reachable("127.0.0.1", 5672):
            with rabbit_vhost(VHOST) as amqp_url:
                results["overhead"]["rabbitmq"] = _step(
                    "overhead rabbitmq",
                    timings,
                    lambda: measure_overhead(amqp_url, plan["rabbit_overhead_requests"], sanity, label="rabbitmq"),
                )
                results["throughput"]["rabbitmq"] = _step(
                    "throughput rabbitmq",
                    timings,
                    lambda: measure_throughput(
                        amqp_url, plan["rabbit_levels"], plan["window_s"], sanity, label="rabbitmq"
                    ),
                )
        elif in_ci:
            errors.append("RabbitMQ is not reachable on 127.0.0.1:5672 (CI=true: a missing server fails the run)")
        else:
            notes.append("RabbitMQ was not reachable: its runs were skipped")
        flush_redis(REDIS_BASE, databases)
        results["lanes"] = _step(
            "lanes", timings, lambda: measure_lanes(redis_url, plan["lane_counts"], plan["lane_requests"], sanity)
        )
        flush_redis(REDIS_BASE, databases)
        results["backlog"] = _step(
            "backlog",
            timings,
            lambda: measure_backlog(redis_url, plan["backlog_tasks"], plan["backlog_concurrency"], sanity),
        )
    except BaseException as exc:
        errors.append(f"{type(exc).__name__}: {exc}")
        traceback.print_exc()
        if isinstance(exc, KeyboardInterrupt | SystemExit):
            raise
    finally:
        stop_all()
        with contextlib.suppress(Exception):
            flush_redis(REDIS_BASE, databases)
    saturation, summary = saturation_notes(results, int(machine.get("cores") or 1))
    results["saturation"] = summary
    notes.extend(peer_notes(sanity))
    finished = time.time()
    report: dict[str, Any] = {
        "mode": mode,
        "plan": plan,
        "started_at": datetime.fromtimestamp(started, UTC).isoformat(timespec="seconds"),
        "finished_at": datetime.fromtimestamp(finished, UTC).isoformat(timespec="seconds"),
        "duration_s": round(finished - started, 1),
        "step_seconds": timings,
        "machine": machine,
        "results": results,
        "targets": evaluate_targets(results),
        "sanity": sanity.as_dict(),
        "errors": errors,
        "run_notes": notes,
        "notes": [*notes, *saturation],
    }
    if profile_data:
        report["profile"] = profile_data
    return report


def write(report: dict[str, Any], results_file: Path = RESULTS_FILE, table_file: Path = TABLE_FILE) -> None:
    """Write the JSON document and the Markdown rendered from it."""
    root = RESULTS_FILE.parents[2]
    report["results_file"] = str(
        results_file.resolve().relative_to(root) if results_file.resolve().is_relative_to(root) else results_file
    )
    results_file.parent.mkdir(parents=True, exist_ok=True)
    results_file.write_text(json.dumps(report, indent=2, sort_keys=False) + "\n")
    table_file.parent.mkdir(parents=True, exist_ok=True)
    findings = FINDINGS_FILE.read_text() if FINDINGS_FILE.exists() else ""
    table_file.write_text(render_markdown(report, findings))


def main(argv: list[str] | None = None) -> int:
    """The command line; the exit status is 0 only for a run without failed or wrong requests."""
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--mode", choices=sorted(MODES), default="quick")
    parser.add_argument("--render-only", action="store_true", help="re-render the table from the saved JSON")
    parser.add_argument(
        "--profile",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="sample the worker with py-spy during a sequential run (skipped when py-spy is missing)",
    )
    parser.add_argument("--results", type=Path, help="the JSON file (default: by mode, see above)")
    parser.add_argument("--table", type=Path, help="the Markdown file (default: by mode, see above)")
    args = parser.parse_args(argv)
    full = args.mode == "full" or args.render_only
    args.results = args.results or (RESULTS_FILE if full else QUICK_RESULTS_FILE)
    args.table = args.table or (TABLE_FILE if full else QUICK_TABLE_FILE)
    if args.render_only:
        report = json.loads(args.results.read_text())
        saturation, summary = saturation_notes(report["results"], int(report["machine"].get("cores") or 1))
        report["results"]["saturation"] = summary
        report["notes"] = [*report.get("run_notes", []), *saturation]
        report["targets"] = evaluate_targets(report["results"])
        write(report, args.results, args.table)
        return 0
    install_signal_handlers()
    report = run(args.mode, profile=args.profile)
    write(report, args.results, args.table)
    sanity = report["sanity"]
    print(
        f"[bench] {args.mode}: {report['duration_s']} s; {sanity['requests']} requests, "
        f"{sanity['failed']} failed, {sanity['wrong']} wrong; results in {args.results}, table in {args.table}",
        file=sys.stderr,
    )
    for note in report["run_notes"]:
        if note.startswith("the plain Celery peer"):
            print(f"[bench] finding: {note}", file=sys.stderr)
    for row in report["targets"]:
        state = {True: "met", False: "MISSED", None: "not measured"}[row["met"]]
        print(f"[bench] target {row['description']}: {row['value']} ({row['target']}) {state}", file=sys.stderr)
    return exit_status(report)


def exit_status(report: dict[str, Any]) -> int:
    """1 when a step failed or a fleet (or direct) request failed or came back wrong, else 0: the plain Celery
    peer's own failures are a finding in the report, not a failure of the run."""
    if report["errors"]:
        print("[bench] errors: " + "; ".join(report["errors"]), file=sys.stderr)
        return 1
    sanity = report["sanity"]
    if not sanity["passed"]:
        print("[bench] sanity failed: " + "; ".join(sanity["problems"][:5]), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
