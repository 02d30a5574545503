"""The ``vllm-fleet`` command line against the live fleet: as a user runs it (a process) and in-process."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from provider.protocol import KeyRing
from provider.settings import SecuritySettings
from tests.tasks.conftest import CHAT_MODEL, EMBED_MODEL, Fleet

CLI = [sys.executable, "-m", "tasks.cli"]


def _run(fleet: Fleet, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **fleet.settings.to_env(), "COLUMNS": "200"}
    return subprocess.run([*CLI, *args], env=env, capture_output=True, text=True, timeout=60)


def test_chat_streams_tokens_to_the_terminal(fleet: Fleet) -> None:
    done = _run(fleet, "chat", CHAT_MODEL, "stream me please", "--stream", "--max-tokens", "16")
    assert done.returncode == 0, done.stderr
    assert "stream me please" in done.stdout


def test_errors_print_one_line_and_exit_non_zero(fleet: Fleet) -> None:
    done = _run(fleet, "chat", "no-such-model", "hello")
    assert done.returncode == 1
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr
    assert "no_fleet_queue" in lines[0]
    assert "Traceback" not in done.stderr


def test_everyday_commands(fleet: Fleet, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    from tasks.cli import main

    assert main(["chat", CHAT_MODEL, "plain answer", "--max-tokens", "8"]) == 0
    assert "plain answer" in capsys.readouterr().out
    assert main(["embed", EMBED_MODEL, "some text", "more text"]) == 0
    assert capsys.readouterr().out.count("dim=384") == 2
    assert main(["offerings"]) == 0
    out = capsys.readouterr().out
    assert "vllm:sim-a:inference:qwen3-6-27b" in out
    assert "llm.fleet.embed.minilm" in out
    assert main(["instances"]) == 0
    assert "llm.fleet.mgmt.sim-a" in capsys.readouterr().out
    assert main(["lanes"]) == 0
    lanes = capsys.readouterr().out
    assert "llm.fleet.inference.small-chat.ctx4096" in lanes
    assert "llm.fleet.inference.qwen3-6-27b.ctx32768.cap.tools" in lanes  # sim-a offers it with tools
    assert main(["manage", "version", "--instance", "sim-a"]) == 0
    assert "version=" in capsys.readouterr().out
    assert main(["manage", "health"]) == 0
    assert "sim-a" in capsys.readouterr().out
    assert main(["discover"]) == 0
    assert "vllm:sim-a:embedding:minilm" in capsys.readouterr().out
    assert main(["dlq", "list"]) == 0
    assert "dead letters" in capsys.readouterr().out
    assert main(["keys", "generate", "--dir", str(tmp_path / "keys")]) == 0
    out = capsys.readouterr().out
    assert (tmp_path / "keys" / "signing" / "k1.pem").exists()
    assert (tmp_path / "keys" / "verify" / "k1.pub.pem").exists()
    assert (tmp_path / "keys" / "sealing" / "e1.aes").exists()
    assert (tmp_path / "keys" / "worker" / "w1.pem").exists()
    assert (tmp_path / "keys" / "response-verify" / "w1.pub.pem").exists()
    assert "PRIVATE KEY" not in out
    env = dict(line.split("=", 1) for line in out.splitlines() if line.startswith("VLLM_FLEET_"))
    worker_ring = KeyRing.from_settings(
        SecuritySettings(
            response_signing_key_file=env["VLLM_FLEET_SECURITY__RESPONSE_SIGNING_KEY_FILE"],
            response_signing_kid=env["VLLM_FLEET_SECURITY__RESPONSE_SIGNING_KID"],
        )
    )
    producer_ring = KeyRing.from_settings(
        SecuritySettings(response_verify_keys_dir=env["VLLM_FLEET_SECURITY__RESPONSE_VERIFY_KEYS_DIR"])
    )
    assert worker_ring.can_sign_responses
    assert not producer_ring.can_sign_responses
    public = producer_ring.response_verify_key("w1")
    assert public is not None
    public.verify(worker_ring.response_signing_key().sign(b"answer"), b"answer")


def test_dead_letters_are_listed_requeued_and_dropped(fleet: Fleet, capsys: pytest.CaptureFixture[str]) -> None:
    from tasks import app, chat
    from tasks.cli import main
    from tasks.routing import pick_lane
    from tasks.runtime import runtime

    rt = runtime()
    messages = [{"role": "user", "content": "from the dead"}]
    lane = pick_lane("chat", CHAT_MODEL, {"messages": messages})["lane"]
    envelopes = [
        rt.codec.build_request(
            operation="chat",
            task_name="vllm.chat",
            lane=lane,
            params={"model": CHAT_MODEL, "messages": messages},
            timeout_s=30,
            model=CHAT_MODEL,
        )
        for _ in range(2)
    ]
    dlq = rt.broker.dead_letter_queue()
    for envelope in envelopes:
        app.send_task("vllm.chat", args=[envelope], task_id=envelope["request_id"], queue=dlq)
    keep, drop = (e["request_id"] for e in envelopes)
    assert main(["dlq", "list"]) == 0
    listed = capsys.readouterr().out
    assert keep in listed
    assert drop in listed
    assert main(["dlq", "requeue", keep]) == 0
    assert keep in capsys.readouterr().out
    assert chat.AsyncResult(keep).get(timeout=20)["content"] == "from the dead"
    assert main(["dlq", "drop"]) == 1  # dropping everything needs --all
    assert "give a TASK_ID, or --all to drop them all" in capsys.readouterr().err
    assert main(["dlq", "list"]) == 0
    assert drop in capsys.readouterr().out
    assert main(["dlq", "drop", "--all"]) == 0
    assert drop in capsys.readouterr().out
    assert main(["dlq", "list"]) == 0
    assert drop not in capsys.readouterr().out


def _row(out: str, first_cell: str) -> list[str]:
    """The cells of the table row that starts with ``first_cell``."""
    for line in out.splitlines():
        cells = [cell.strip() for cell in line.strip("│┃ ").split("│")]
        if cells and cells[0] == first_cell:
            return cells
    raise AssertionError(f"no row {first_cell!r} in:\n{out}")


def test_manage_and_discover_print_a_table_and_json_prints_the_envelope(
    fleet: Fleet, capsys: pytest.CaptureFixture[str]
) -> None:
    from tasks.cli import main

    assert main(["manage", "is_sleeping", "--instance", "sim-a"]) == 0
    out = capsys.readouterr().out
    assert _row(out, "sim-a") == ["sim-a", "yes", "is_sleeping=no"]
    assert "message_type" not in out
    assert main(["manage", "health"]) == 0
    assert _row(capsys.readouterr().out, "sim-a") == ["sim-a", "yes", "live=yes"]
    assert main(["manage", "version", "--instance", "sim-a", "--json"]) == 0
    envelope = json.loads(capsys.readouterr().out)
    assert envelope["message_type"] == "llm.fleet.response"
    assert envelope["result"]["version"]
    assert main(["discover"]) == 0
    cells = _row(capsys.readouterr().out, "sim-a")
    assert cells[:2] == ["sim-a", "yes"]
    assert cells[2].startswith("live=yes, offerings=")
    assert "vllm:sim-a:embedding:minilm" in cells[2]
    assert main(["discover", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["sim-a"]["result"]["message_type"] == "llm.fleet.response"


def test_lanes_count_live_consumers(fleet: Fleet, capsys: pytest.CaptureFixture[str]) -> None:
    from tasks.cli import main

    assert main(["lanes"]) == 0
    cells = _row(capsys.readouterr().out, "llm.fleet.inference.small-chat.ctx4096")
    assert int(cells[2]) >= 1, cells  # the session's worker consumes it (not "-")


def test_every_option_has_help_text() -> None:
    from tasks.cli import build_parser

    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    missing = [
        f"{name} {action.dest}"
        for name, sub in subparsers.choices.items()
        for action in sub._actions
        if not isinstance(action, argparse._HelpAction) and not action.help
    ]
    assert missing == []
    assert {choice.dest for choice in subparsers._choices_actions if not choice.help} == set()
