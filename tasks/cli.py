"""``vllm-fleet``: the command line people use every day with the fleet.

    vllm-fleet keys generate --dir keys          # Ed25519 signing pair + AES sealing key, and the env lines
    vllm-fleet worker [--processes K]            # a worker for the configured instances (threads pool)
    vllm-fleet beat                              # the periodic discovery refresh (run exactly one)
    vllm-fleet chat MODEL "prompt" [--stream]    # submit a chat; --stream prints tokens as they come
    vllm-fleet embed MODEL "text" ...            # submit an embedding
    vllm-fleet offerings | instances | lanes     # what the fleet serves, and lane depths
    vllm-fleet manage ACTION --instance NAME|all # health, version, sleep, wake_up, reset caches, ...
    vllm-fleet discover                          # refresh every instance now
    vllm-fleet dlq list | requeue [ID] | drop [ID] # the dead-letter queue
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

__all__ = ["main"]

console = Console()
err_console = Console(stderr=True)
_MANAGEMENT_ACTIONS = (
    "health",
    "readiness",
    "version",
    "list_models",
    "is_sleeping",
    "sleep",
    "wake_up",
    "reset_prefix_cache",
    "reset_mm_cache",
)
_MANAGEMENT_HEADROOM = 2
_PIPED_WIDTH = 400


def _cmd_keys(args: argparse.Namespace) -> int:
    from provider.protocol import generate_encryption_key, generate_keypair

    root = Path(args.dir)
    pair = generate_keypair(args.kind, kid=args.kid)
    sealing = generate_encryption_key(kid=args.encryption_kid)
    private_name, *public_names = pair.files()
    files = pair.files()
    layout = {
        root / "signing" / private_name: files[private_name],
        **{root / "verify" / name: files[name] for name in (public_names or [private_name])},
        **{root / "sealing" / name: text for name, text in sealing.files().items()},
    }
    for path, text in layout.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        path.chmod(0o600)
    algorithm = "HS256" if args.kind == "hs256" else {"ed25519": "EdDSA", "rs256": "RS256", "es256": "ES256"}[args.kind]
    console.print(f"# keys written under {root}/ (signing/: producers only; verify/: workers; sealing/: both)")
    console.print(f"VLLM_FLEET_SECURITY__ALGORITHM={algorithm}")
    console.print(f"VLLM_FLEET_SECURITY__SIGNING_KID={pair.kid}")
    console.print(f"VLLM_FLEET_SECURITY__SIGNING_KEY_FILE={root / 'signing' / private_name}")
    console.print(f"VLLM_FLEET_SECURITY__VERIFY_KEYS_DIR={root / 'verify'}")
    console.print(f"VLLM_FLEET_SECURITY__ENCRYPTION_KID={sealing.kid}")
    console.print(f"VLLM_FLEET_SECURITY__ENCRYPTION_KEYS_DIR={root / 'sealing'}")
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


def worker_concurrency() -> int:
    """Threads for a worker: every instance's concurrency limit, plus room for management calls."""
    from provider.discovery import instances_to_serve
    from provider.settings import get_settings

    instances = instances_to_serve(get_settings())
    return sum(i.concurrency for i in instances) + _MANAGEMENT_HEADROOM


def _cmd_worker(args: argparse.Namespace) -> int:
    from provider.settings import get_settings

    settings = get_settings()
    processes = args.processes or settings.worker_processes
    if processes > 1 and settings.worker_process_index == 0:
        from provider.discovery import instances_to_serve
        from tasks.process_group import run_worker_group

        instances = instances_to_serve(settings)
        return run_worker_group(
            processes, instances, hostname=args.hostname, loglevel=args.loglevel, concurrency=args.concurrency
        )
    from tasks.app import app

    argv = [
        "worker",
        "-P",
        "threads",
        "-c",
        str(args.concurrency or worker_concurrency()),
        "--without-mingle",
        "-l",
        args.loglevel,
    ]
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


def _cmd_lanes(args: argparse.Namespace) -> int:
    from tasks.app import app
    from tasks.runtime import runtime

    rt = runtime()
    lanes = sorted({o.lane(rt.settings.lanes.style) for o in rt.registry.all()})
    table = Table("lane", "waiting", "consumers")
    for lane in lanes:
        if rt.amqp:
            with app.connection_for_write() as conn:
                channel: Any = conn.default_channel
                declared = channel.queue_declare(lane, passive=True)
                waiting, consumers = str(declared.message_count), str(declared.consumer_count)
        else:
            waiting, consumers = str(rt.lane_depth(lane)), "-"
        table.add_row(lane, waiting, consumers)
    console.print(table)
    return 0


def _cmd_manage(args: argparse.Namespace) -> int:
    import tasks.fleet as fleet

    task = getattr(fleet, args.action)
    params: dict[str, Any] = {"instance": args.instance}
    if args.action == "sleep":
        params["level"] = args.level
        if args.mode:
            params["mode"] = args.mode
    with console.status(f"{args.action} on {args.instance}…"):
        answer = task.delay(**params).get()
    console.print_json(json.dumps(answer))
    return 0


def _cmd_discover(args: argparse.Namespace) -> int:
    from tasks import discover

    with console.status("refreshing every instance…"):
        answer = discover.delay(instance="all").get()
    console.print_json(json.dumps(answer))
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
    keys.add_argument("action", choices=["generate"])
    keys.add_argument("--dir", default="keys")
    keys.add_argument("--kind", choices=["ed25519", "hs256", "rs256", "es256"], default="ed25519")
    keys.add_argument("--kid", default="k1")
    keys.add_argument("--encryption-kid", default="e1")
    keys.set_defaults(run=_cmd_keys)

    worker = sub.add_parser("worker", help="run a worker for the configured instances")
    worker.add_argument("--concurrency", type=int, default=0, help="threads (default: instances' limits + 2)")
    worker.add_argument("--hostname", default=os.environ.get("VLLM_FLEET_WORKER_NAME"))
    worker.add_argument("--loglevel", default="INFO")
    worker.add_argument(
        "--processes",
        type=int,
        default=0,
        help="worker processes sharing each instance's slots (default: WORKER_PROCESSES, 1); one per core",
    )
    worker.set_defaults(run=_cmd_worker)

    beat = sub.add_parser("beat", help="run Celery Beat (exactly one per fleet)")
    beat.add_argument("--schedule", default="celerybeat-schedule")
    beat.add_argument("--loglevel", default="INFO")
    beat.set_defaults(run=_cmd_beat)

    chat = sub.add_parser("chat", help="submit a chat and print the answer")
    chat.add_argument("model")
    chat.add_argument("prompt")
    chat.add_argument("--system")
    chat.add_argument("--max-tokens", type=int, default=0)
    chat.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    chat.add_argument("--no-think", action="store_true", help="turn thinking off for this request")
    chat.add_argument("--json", action="store_true", help="print the whole response envelope")
    chat.set_defaults(run=_cmd_chat)

    embed = sub.add_parser("embed", help="submit an embedding")
    embed.add_argument("model")
    embed.add_argument("texts", nargs="+")
    embed.set_defaults(run=_cmd_embed)

    for name, run, text in (
        ("offerings", _cmd_offerings, "list live offerings"),
        ("instances", _cmd_instances, "list live instances"),
        ("lanes", _cmd_lanes, "lanes with their waiting messages and consumers"),
        ("discover", _cmd_discover, "refresh every instance now"),
    ):
        sub.add_parser(name, help=text).set_defaults(run=run)

    manage = sub.add_parser("manage", help="a management call on one instance or all")
    manage.add_argument("action", choices=_MANAGEMENT_ACTIONS)
    manage.add_argument("--instance", default="all")
    manage.add_argument("--level", type=int, default=1)
    manage.add_argument("--mode", choices=["abort", "wait", "keep"])
    manage.set_defaults(run=_cmd_manage)

    dlq = sub.add_parser("dlq", help="inspect the dead-letter queue; requeue or drop what is in it")
    dlq.add_argument("action", choices=["list", "requeue", "drop"])
    dlq.add_argument("task_id", nargs="?", help="one task (default: all)")
    dlq.set_defaults(run=_cmd_dlq)

    sim = sub.add_parser("sim", help="start the vLLM simulator", add_help=False)
    sim.add_argument("sim_args", nargs=argparse.REMAINDER)
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
