"""``vllm-fleet``: the command line people use every day with the fleet.

    vllm-fleet keys generate --dir keys          # Ed25519 request and response pairs + AES key, and the env lines
    vllm-fleet worker [--processes K]            # a worker for the configured instances (threads pool)
    vllm-fleet beat                              # the periodic discovery refresh (run exactly one)
    vllm-fleet chat MODEL "prompt" [--stream]    # submit a chat; --stream prints tokens as they come
    vllm-fleet embed MODEL "text" ...            # submit an embedding
    vllm-fleet offerings | instances | lanes     # what the fleet serves, and lane depths
    vllm-fleet manage ACTION --instance NAME|all # health, version, sleep, ... as a table (--json: envelopes)
    vllm-fleet discover                          # refresh every instance now
    vllm-fleet dlq list | requeue [ID] | drop ID|--all # the dead-letter queue
    vllm-fleet sim ...                           # start the vLLM simulator (same flags as vllm-sim)

Every command reads the same settings as workers (``VLLM_FLEET_*``, ``VLLM_FLEET_CONFIG``). Errors print one
line and exit with status 1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from provider.protocol import MANAGEMENT_OPERATIONS

__all__ = ["main"]

console = Console()
err_console = Console(stderr=True)
# ``discover`` has its own command.
_MANAGEMENT_ACTIONS = tuple(operation for operation in MANAGEMENT_OPERATIONS if operation != "discover")
_PIPED_WIDTH = 400
_INSPECT_TIMEOUT_S = 1.0


class DropNeedsAllError(Exception):
    """``dlq drop`` with neither a task id nor ``--all``."""

    code = "confirmation_required"


class NoInstancesError(Exception):
    """``vllm-fleet worker`` with no vLLM instance to serve."""

    code = "no_instances"


class KeyFileExistsError(Exception):
    """A key file to write is already there: key files are never overwritten."""

    code = "key_file_exists"


def write_key_files(layout: dict[Path, str]) -> None:
    """Write each key file (mode 0600), or none at all if any of them exists: a key file is never overwritten."""
    present = [str(path) for path in layout if path.exists()]
    if present:
        raise KeyFileExistsError(
            f"refusing to overwrite {', '.join(present)}: key files are never overwritten; to rotate, give new ids "
            "(--kid k2 --encryption-kid e2 --worker-kid w2), or write to another --dir"
        )
    for path, text in layout.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as file:
            file.write(text)


def _cmd_keys(args: argparse.Namespace) -> int:
    from provider.protocol import generate_encryption_key, generate_keypair

    root = Path(args.dir)
    pair = generate_keypair(args.kind, kid=args.kid)
    sealing = generate_encryption_key(kid=args.encryption_kid)
    worker = generate_keypair("ed25519", kid=args.worker_kid)  # responses are always Ed25519
    private_name, *public_names = pair.files()
    files = pair.files()
    worker_private, worker_public = worker.files()
    layout = {
        root / "signing" / private_name: files[private_name],
        **{root / "verify" / name: files[name] for name in (public_names or [private_name])},
        **{root / "sealing" / name: text for name, text in sealing.files().items()},
        root / "worker" / worker_private: worker.private,
        root / "response-verify" / worker_public: worker.public,
    }
    write_key_files(layout)
    algorithm = "HS256" if args.kind == "hs256" else {"ed25519": "EdDSA", "rs256": "RS256", "es256": "ES256"}[args.kind]
    console.print(
        f"# keys written under {root}/ (signing/: producers only; verify/: workers; sealing/: both; "
        "worker/: workers only, signs answers; response-verify/: producers)"
    )
    console.print(f"VLLM_FLEET_SECURITY__ALGORITHM={algorithm}")
    console.print(f"VLLM_FLEET_SECURITY__SIGNING_KID={pair.kid}")
    console.print(f"VLLM_FLEET_SECURITY__SIGNING_KEY_FILE={root / 'signing' / private_name}")
    console.print(f"VLLM_FLEET_SECURITY__VERIFY_KEYS_DIR={root / 'verify'}")
    console.print(f"VLLM_FLEET_SECURITY__ENCRYPTION_KID={sealing.kid}")
    console.print(f"VLLM_FLEET_SECURITY__ENCRYPTION_KEYS_DIR={root / 'sealing'}")
    console.print(f"VLLM_FLEET_SECURITY__RESPONSE_SIGNING_KID={worker.kid}")
    console.print(f"VLLM_FLEET_SECURITY__RESPONSE_SIGNING_KEY_FILE={root / 'worker' / worker_private}")
    console.print(f"VLLM_FLEET_SECURITY__RESPONSE_VERIFY_KEYS_DIR={root / 'response-verify'}")
    return 0


def worker_process_argv(name: str, concurrency: int, loglevel: str = "WARNING") -> list[str]:
    """The command line of one worker process (threads pool), as tests, benchmarks and scripts start it."""
    return [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "tasks.app",
        "worker",
        "-P",
        "threads",
        "-c",
        str(concurrency),
        "-n",
        f"{name}@%h",
        "--without-mingle",
        "--without-gossip",
        "-l",
        loglevel,
    ]


def worker_group_argv(name: str, processes: int, loglevel: str = "WARNING") -> list[str]:
    """The command line of a worker of ``processes`` processes sharing its instances' slots (``--processes``)."""
    return [
        sys.executable,
        "-m",
        "tasks.cli",
        "worker",
        "--processes",
        str(processes),
        "--hostname",
        f"{name}@%h",
        "--loglevel",
        loglevel,
    ]


def _cmd_worker(args: argparse.Namespace) -> int:
    from provider.settings import get_settings
    from provider.sizing import default_process_count, worker_threads
    from provider.vllm.discovery import instances_to_serve, no_instances_reason
    from tasks.process_group import run_worker_group

    settings = get_settings()
    instances = instances_to_serve(settings)
    if not instances:
        raise NoInstancesError(no_instances_reason(settings))
    if settings.worker_process_index == 0:
        sized = default_process_count([i.concurrency for i in instances])
        processes = args.processes or settings.worker_processes or sized
        if processes > 1:
            return run_worker_group(
                processes, instances, hostname=args.hostname, loglevel=args.loglevel, concurrency=args.concurrency
            )
    from tasks.app import app

    threads = args.concurrency or worker_threads([i.concurrency for i in instances])
    argv = ["worker", "-P", "threads", "-c", str(threads), "--without-mingle", "-l", args.loglevel]
    if args.hostname:
        argv += ["-n", args.hostname]
    app.worker_main(argv)
    return 0


def _cmd_beat(args: argparse.Namespace) -> int:
    from tasks.app import app

    app.start(["beat", "-l", args.loglevel, "-s", args.schedule])
    return 0


def _messages(prompt: str, system: str | None) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": system}] if system else []
    return [*messages, {"role": "user", "content": prompt}]


def _cmd_chat(args: argparse.Namespace) -> int:
    from tasks import StreamReset, chat, open_stream, stream_chat

    request: dict[str, Any] = {"model": args.model, "messages": _messages(args.prompt, args.system)}
    if args.max_tokens:
        request["max_tokens"] = args.max_tokens
    if args.no_think:
        request["thinking"] = {"enabled": False}
    if args.stream:
        result = stream_chat.delay(**request)
        for item in open_stream(result.id):
            if isinstance(item, StreamReset):
                console.print("\n[yellow]… the server dropped the stream; restarting[/yellow]")
            elif item.content:
                console.print(item.content, end="", soft_wrap=True, markup=False, highlight=False)
        console.print()
        return 0
    with console.status("waiting for the fleet…"):
        reply = chat.delay(**request).get()
    if args.json:
        console.print_json(json.dumps(reply))
    else:
        console.print(reply.get("content") or "", markup=False, highlight=False)
    return 0


def _cmd_embed(args: argparse.Namespace) -> int:
    from tasks import embed

    with console.status("waiting for the fleet…"):
        reply = embed.delay(model=args.model, input=args.texts).get()
    vectors = reply["result"]["vectors"]
    for text, vector in zip(args.texts, vectors, strict=True):
        head = ", ".join(f"{v:.4f}" for v in vector[:4])
        console.print(f"{text[:40]!r}: dim={len(vector)} [{head}, …]", markup=False)
    return 0


def _cmd_offerings(args: argparse.Namespace) -> int:
    from tasks.runtime import runtime

    table = Table("offering", "instance", "model", "usage", "context", "lane", "status")
    for o in sorted(runtime().registry.all(), key=lambda o: o.offering_id):
        table.add_row(
            o.offering_id, o.instance_id, o.model, o.usage_type, str(o.context_window or "-"), o.shared_lane, o.status
        )
    console.print(table)
    return 0


def _cmd_instances(args: argparse.Namespace) -> int:
    from tasks.runtime import runtime

    table = Table("instance", "management queue", "tier", "models")
    for record in runtime().registry.instances():
        table.add_row(
            record["name"], record.get("queue", ""), record.get("tier", ""), ", ".join(record.get("models", []))
        )
    console.print(table)
    return 0


def _live_consumers() -> dict[str, int]:
    """How many running workers consume each queue (one remote-control round; the broker cannot tell on Redis)."""
    from tasks.app import app

    answers = app.control.inspect(timeout=_INSPECT_TIMEOUT_S).active_queues() or {}
    counts: dict[str, int] = {}
    for queues in answers.values():
        for queue in queues or []:
            counts[queue["name"]] = counts.get(queue["name"], 0) + 1
    return counts


def _cmd_lanes(args: argparse.Namespace) -> int:
    from tasks.app import app
    from tasks.runtime import runtime

    rt = runtime()
    style = rt.settings.lanes.style
    found: set[str] = set()
    for offering in rt.registry.all():
        found.add(offering.lane(style))
        if style == "shared":
            found.update(offering.capability_lanes())
    lanes = sorted(found)
    live: dict[str, int] | None = None
    table = Table("lane", "waiting", "consumers")
    with app.connection_for_write() as conn:
        for lane in lanes:
            consumers = rt.broker.lane_consumers(lane, conn)
            if consumers is None:  # the broker cannot tell: ask the workers (once)
                live = _live_consumers() if live is None else live
                consumers = live.get(lane, 0)
            table.add_row(lane, str(rt.broker.lane_depth(lane, conn)), str(consumers))
    console.print(table)
    return 0


def _shown(value: Any) -> str:
    """A management result as one table cell: ``key=value`` pairs, lists joined, anything deeper as JSON."""
    if isinstance(value, dict):
        return ", ".join(f"{key}={_shown(item)}" for key, item in value.items()) or "-"
    if isinstance(value, list):
        return ", ".join(_shown(item) if isinstance(item, str) else json.dumps(item) for item in value) or "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


def _answers_table(title: str, answers: dict[str, Any]) -> Table:
    """``instance → {ok, result | error}`` (what a call on every instance answers) as a table."""
    table = Table("instance", "ok", "result", title=title)
    for instance, answer in sorted(answers.items()):
        if answer.get("ok"):
            table.add_row(instance, "yes", _shown((answer.get("result") or {}).get("result")))
        else:
            error = answer.get("error") or {}
            table.add_row(instance, "[red]no[/red]", f"{error.get('code')}: {error.get('message')}")
    return table


def _cmd_manage(args: argparse.Namespace) -> int:
    from tasks.app import fleet_task

    task = fleet_task(args.action)
    params: dict[str, Any] = {"instance": args.instance}
    if args.action == "sleep":
        params["level"] = args.level
        if args.mode:
            params["mode"] = args.mode
    with console.status(f"{args.action} on {args.instance}…"):
        answer = task.delay(**params).get()
    if args.json:
        console.print_json(json.dumps(answer))
    elif args.instance == "all":
        console.print(_answers_table(args.action, answer))
    else:
        console.print(_answers_table(args.action, {args.instance: {"ok": True, "result": answer}}))
    return 0


def _cmd_discover(args: argparse.Namespace) -> int:
    from tasks import discover

    with console.status("refreshing every instance…"):
        answer = discover.delay(instance="all").get()
    if args.json:
        console.print_json(json.dumps(answer))
    else:
        console.print(_answers_table("discover", answer))
    return 0


def _cmd_dlq(args: argparse.Namespace) -> int:
    from tasks.dead_letters import drop_dead_letters, list_dead_letters, requeue_dead_letters

    if args.action == "list":
        letters = list_dead_letters()
        title = "dead letters"
    elif args.action == "requeue":
        letters = requeue_dead_letters(args.task_id)
        title = "requeued to their lanes"
    else:
        if not args.task_id and not args.all:
            raise DropNeedsAllError(
                "dlq drop without a TASK_ID drops every dead letter: give a TASK_ID, or --all to drop them all"
            )
        letters = drop_dead_letters(args.task_id)
        title = "dropped"
    table = Table("task id", "task", "lane", "operation", "reason", "requeued as", title=f"{title}: {len(letters)}")
    for letter in letters:
        table.add_row(*letter.as_row())
    console.print(table)
    return 0


def _cmd_sim(args: argparse.Namespace) -> int:
    from simulator.cli import main as sim_main

    sim_main(args.sim_args)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (kept separate for tests)."""
    parser = argparse.ArgumentParser(prog="vllm-fleet", description="Run LLM work on a vLLM fleet through Celery.")
    sub = parser.add_subparsers(dest="command", required=True)

    keys = sub.add_parser("keys", help="generate signing and sealing keys")
    keys.add_argument("action", choices=["generate"], help="generate: write new key files (never overwrites one)")
    keys.add_argument("--dir", default="keys", help="where to write signing/, verify/ and sealing/ (default: keys)")
    keys.add_argument(
        "--kind",
        choices=["ed25519", "hs256", "rs256", "es256"],
        default="ed25519",
        help="signing key type (default: ed25519, i.e. EdDSA)",
    )
    keys.add_argument("--kid", default="k1", help="id of the new signing key (default: k1; k2 to rotate)")
    keys.add_argument("--encryption-kid", default="e1", help="id of the new sealing key (default: e1; e2 to rotate)")
    keys.add_argument(
        "--worker-kid", default="w1", help="id of the workers' Ed25519 response signing key (default: w1)"
    )
    keys.set_defaults(run=_cmd_keys)

    worker = sub.add_parser("worker", help="run a worker for the configured instances")
    worker.add_argument("--concurrency", type=int, default=0, help="threads (default: instances' limits + 2)")
    worker.add_argument(
        "--hostname",
        default=os.environ.get("VLLM_FLEET_WORKER_NAME"),
        help="Celery node name, e.g. gpu-1@%%h (default: VLLM_FLEET_WORKER_NAME, else Celery's)",
    )
    worker.add_argument("--loglevel", default="INFO", help="DEBUG, INFO, WARNING or ERROR (default: INFO)")
    worker.add_argument(
        "--processes",
        type=int,
        default=0,
        help="worker processes sharing each instance's slots (default: WORKER_PROCESSES, else one per 32 slots "
        "of the instances, at most one per core and no more than the smallest instance's concurrency)",
    )
    worker.set_defaults(run=_cmd_worker)

    beat = sub.add_parser("beat", help="run Celery Beat (exactly one per fleet)")
    beat.add_argument(
        "--schedule", default="celerybeat-schedule", help="Beat's state file (default: ./celerybeat-schedule)"
    )
    beat.add_argument("--loglevel", default="INFO", help="DEBUG, INFO, WARNING or ERROR (default: INFO)")
    beat.set_defaults(run=_cmd_beat)

    chat = sub.add_parser("chat", help="submit a chat and print the answer")
    chat.add_argument("model", help="a served model name or alias (`vllm-fleet offerings` lists them)")
    chat.add_argument("prompt", help="the user message")
    chat.add_argument("--system", help="a system message before the prompt")
    chat.add_argument("--max-tokens", type=int, default=0, help="most tokens to generate (default: the server's)")
    chat.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    chat.add_argument("--no-think", action="store_true", help="turn thinking off for this request")
    chat.add_argument("--json", action="store_true", help="print the whole response envelope")
    chat.set_defaults(run=_cmd_chat)

    embed = sub.add_parser("embed", help="submit an embedding")
    embed.add_argument("model", help="an embedding model (`vllm-fleet offerings` lists them)")
    embed.add_argument("texts", nargs="+", help="one or more texts, one vector each")
    embed.set_defaults(run=_cmd_embed)

    for name, run, text in (
        ("offerings", _cmd_offerings, "list live offerings"),
        ("instances", _cmd_instances, "list live instances"),
        ("lanes", _cmd_lanes, "lanes with their waiting messages and consumers"),
    ):
        sub.add_parser(name, help=text).set_defaults(run=run)
    discover = sub.add_parser("discover", help="refresh every instance now")
    discover.add_argument("--json", action="store_true", help="print every instance's whole response envelope")
    discover.set_defaults(run=_cmd_discover)

    manage = sub.add_parser("manage", help="a management call on one instance or all")
    manage.add_argument("action", choices=_MANAGEMENT_ACTIONS, help="the vLLM management call")
    manage.add_argument("--instance", default="all", help="an instance name, or all (default)")
    manage.add_argument("--level", type=int, default=1, help="sleep level: 1 offloads weights, 2 discards them")
    manage.add_argument("--mode", choices=["abort", "wait", "keep"], help="sleep: what to do with running requests")
    manage.add_argument("--json", action="store_true", help="print the whole response envelope")
    manage.set_defaults(run=_cmd_manage)

    dlq = sub.add_parser("dlq", help="inspect the dead-letter queue; requeue or drop what is in it")
    dlq.add_argument("action", choices=["list", "requeue", "drop"], help="list, requeue to their lanes, or drop")
    dlq.add_argument("task_id", nargs="?", help="one task (default: all; drop needs --all for that)")
    dlq.add_argument("--all", action="store_true", help="drop: confirm dropping every dead letter")
    dlq.set_defaults(run=_cmd_dlq)

    sim = sub.add_parser("sim", help="start the vLLM simulator", add_help=False)
    sim.add_argument("sim_args", nargs=argparse.REMAINDER, help="vllm-sim's own flags (vllm-sim --help)")
    sim.set_defaults(run=_cmd_sim)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``vllm-fleet``."""
    args = build_parser().parse_args(argv)
    if not console.is_terminal:  # piped or captured: never cut ids and lane names to fit 80 columns
        console.width = _PIPED_WIDTH
    try:
        code: int = args.run(args)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # one clear line, never a traceback, for any failure
        code_name = getattr(exc, "code", None)
        prefix = f"{code_name}: " if isinstance(code_name, str) else f"{type(exc).__name__}: "
        message = getattr(exc, "message", None) or str(exc)
        err_console.print(f"[red]error[/red] {prefix}{message}", highlight=False)
        return 1
    return code


if __name__ == "__main__":
    sys.exit(main())
