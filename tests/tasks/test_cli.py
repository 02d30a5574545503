"""The ``vllm-fleet`` command line against the live fleet: as a user runs it (a process) and in-process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

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
    assert '"version"' in capsys.readouterr().out
    assert main(["manage", "health"]) == 0
    assert '"sim-a"' in capsys.readouterr().out
    assert main(["discover"]) == 0
    assert "vllm:sim-a:embedding:minilm" in capsys.readouterr().out
    assert main(["dlq", "list"]) == 0
    assert "dead letters" in capsys.readouterr().out
    assert main(["keys", "generate", "--dir", str(tmp_path / "keys")]) == 0
    out = capsys.readouterr().out
    assert (tmp_path / "keys" / "signing" / "k1.pem").exists()
    assert (tmp_path / "keys" / "verify" / "k1.pub.pem").exists()
    assert (tmp_path / "keys" / "sealing" / "e1.aes").exists()
    assert "PRIVATE KEY" not in out


def test_dead_letters_are_listed_requeued_and_dropped(fleet: Fleet, capsys: pytest.CaptureFixture[str]) -> None:
    from tasks import app, chat
    from tasks.cli import main
    from tasks.queues import dead_letter_queue
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
    dlq = dead_letter_queue(fleet.settings.lanes, rt.amqp)
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
    assert main(["dlq", "drop"]) == 0
    assert drop in capsys.readouterr().out
    assert main(["dlq", "list"]) == 0
    assert drop not in capsys.readouterr().out
