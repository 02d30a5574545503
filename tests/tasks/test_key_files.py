"""``vllm-fleet keys generate`` and rotation with key files, as the README's "Rotate keys" step runs it.

Generating never overwrites a key file (the live sealing key included): a second run into the same directory is
refused and changes nothing. Rotation writes the new signing pair and sealing key beside the old ones; a worker
started with both serves producers still on the old kids and producers already on the new ones, side by side.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from provider.settings import SecuritySettings, Settings
from simulator.testing import SimulatorServer
from tests.tasks.conftest import Fleet, wait_for
from tests.tasks.test_replay import forget_instance, settings_for, simulator_for, start_worker

CLI = [sys.executable, "-m", "tasks.cli"]
ROTATE_MODEL = "rotate-files-chat"
INSTANCE = "sim-rotate-files"
REFUSAL = "key files are never overwritten; to rotate, give new ids (--kid k2 --encryption-kid e2 --worker-kid w2)"


def keys_generate(directory: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    """``vllm-fleet keys generate --dir DIRECTORY [flags]`` as a user runs it."""
    argv = [*CLI, "keys", "generate", "--dir", str(directory), *flags]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, env={**os.environ, "COLUMNS": "300"})


def contents(directory: Path) -> dict[str, str]:
    """Every file under ``directory`` by relative path."""
    return {str(p.relative_to(directory)): p.read_text() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_generate_twice_into_one_directory_is_refused_and_changes_nothing(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    first = keys_generate(keys)
    assert first.returncode == 0, first.stderr
    before = contents(keys)
    assert set(before) == {
        "signing/k1.pem",
        "verify/k1.pub.pem",
        "sealing/e1.aes",
        "worker/w1.pem",
        "response-verify/w1.pub.pem",
    }

    again = keys_generate(keys)
    assert again.returncode == 1
    message = " ".join(again.stderr.split())
    assert f"key_file_exists: refusing to overwrite {keys / 'signing' / 'k1.pem'}" in message
    assert REFUSAL in message
    assert contents(keys) == before

    # The README's old rotation step: a new signing kid only would have replaced the live sealing key e1.
    signing_only = keys_generate(keys, "--kid", "k2", "--worker-kid", "w2")
    assert signing_only.returncode == 1
    message = " ".join(signing_only.stderr.split())
    assert f"refusing to overwrite {keys / 'sealing' / 'e1.aes'}:" in message
    assert contents(keys) == before  # nothing written, not even k2's pair


@pytest.fixture(scope="module")
def rotation_simulator() -> Iterator[SimulatorServer]:
    """The vLLM behind the rotated worker."""
    with simulator_for(ROTATE_MODEL) as server:
        yield server


def file_security(keys: Path, kid: str, encryption_kid: str, worker_kid: str, *, signing: bool) -> SecuritySettings:
    """Security settings read from the generated files: a producer's (signing) or a worker's (answers)."""
    return SecuritySettings(
        signing_kid=kid,
        signing_key_file=keys / "signing" / f"{kid}.pem" if signing else None,
        verify_keys_dir=keys / "verify",
        encryption_kid=encryption_kid,
        encryption_keys_dir=keys / "sealing",
        response_signing_kid=worker_kid,
        response_signing_key_file=None if signing else keys / "worker" / f"{worker_kid}.pem",
        response_verify_keys_dir=keys / "response-verify",
    )


def chat_as(settings: Settings, text: str) -> subprocess.CompletedProcess[str]:
    """``vllm-fleet chat`` in a producer process configured with ``settings``."""
    env = {**os.environ, **settings.to_env(), "COLUMNS": "300"}
    argv = [*CLI, "chat", ROTATE_MODEL, text, "--max-tokens", "16"]
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)


@pytest.mark.only_broker("redis")
def test_rotating_signing_and_sealing_keys_serves_old_and_new_side_by_side(
    fleet: Fleet, rotation_simulator: SimulatorServer, tmp_path: Path
) -> None:
    keys = tmp_path / "keys"
    assert keys_generate(keys).returncode == 0
    live = contents(keys)
    rotated = keys_generate(keys, "--kid", "k2", "--encryption-kid", "e2", "--worker-kid", "w2")  # README's step
    assert rotated.returncode == 0, rotated.stderr
    after = contents(keys)
    assert {name: after[name] for name in live} == live  # the live keys are untouched
    assert set(after) - set(live) == {
        "signing/k2.pem",
        "verify/k2.pub.pem",
        "sealing/e2.aes",
        "worker/w2.pem",
        "response-verify/w2.pub.pem",
    }

    worker_settings = settings_for(fleet, rotation_simulator, INSTANCE)
    # Producers trust w1 and w2 (both in response-verify/); the restarted worker answers with the new w2.
    worker_security = file_security(keys, "k1", "e1", "w2", signing=False)
    worker_settings = worker_settings.model_copy(update={"security": worker_security})
    old_producer = worker_settings.model_copy(update={"security": file_security(keys, "k1", "e1", "w1", signing=True)})
    new_producer = worker_settings.model_copy(update={"security": file_security(keys, "k2", "e2", "w2", signing=True)})
    worker = start_worker(worker_settings, "rotate-files")  # restarted with both kids in verify/ and sealing/
    try:
        # The worker's registry record is signed with w2: producers that trust response-verify/ see it.
        wait_for(lambda: chat_as(old_producer, "warm up").returncode == 0, what="the producers seeing the worker")
        for producer, text in ((old_producer, "signed k1 sealed e1"), (new_producer, "signed k2 sealed e2")):
            done = chat_as(producer, text)
            assert done.returncode == 0, done.stderr + worker.process.logs()
            assert text in done.stdout
        worker.assert_refusals([])
    finally:
        worker.stop()
        forget_instance(INSTANCE)
