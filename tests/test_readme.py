"""The README's commands work as written: the first brings a fleet up and prints the sample results."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REDIS_HOST, REDIS_PORT, require_server

ROOT = Path(__file__).resolve().parent.parent


def _readme_commands() -> list[str]:
    block = re.search(r"## Two commands\s+```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert block, "the README must open with its two commands"
    return [line.split("#")[0].strip() for line in block.group(1).splitlines() if line.strip()]


def test_readme_gives_exactly_two_commands_and_ci_runs_the_test_one() -> None:
    commands = _readme_commands()
    assert commands == ["make fleet", "make test"]
    ci = (ROOT / ".ci" / "run").read_text()
    assert "\nmake test\n" in ci


@pytest.mark.timeout(180)
def test_first_command_brings_up_a_fleet_and_runs_the_samples(tmp_path: Path) -> None:
    """What ``make fleet`` runs after installing: scripts/fleet.py up --sample (isolated port, databases, prefix)."""
    require_server("Redis", REDIS_HOST, REDIS_PORT)
    env = {
        **os.environ,
        "FLEET_RUN_DIR": str(tmp_path / "run"),
        "FLEET_SIM_PORT": "18081",
        "FLEET_FLOWER_PORT": "18555",
        "VLLM_FLEET_BROKER_URL": f"redis://{REDIS_HOST}:{REDIS_PORT}/7",
        "VLLM_FLEET_RESULT_BACKEND": f"redis://{REDIS_HOST}:{REDIS_PORT}/8",
        "VLLM_FLEET_REDIS_URL": f"redis://{REDIS_HOST}:{REDIS_PORT}/9",
        "VLLM_FLEET_KEY_PREFIX": f"readme-{os.getpid()}",
    }
    env.pop("VLLM_URL", None)
    script = [sys.executable, str(ROOT / "scripts" / "fleet.py")]
    try:
        up = subprocess.run([*script, "up", "--sample"], env=env, capture_output=True, text=True, timeout=150)
        flower = _flower_answers(tmp_path / "run" / "flower-auth", "http://127.0.0.1:18555")
    finally:
        subprocess.run([*script, "down"], env=env, capture_output=True, text=True, timeout=30)
    assert up.returncode == 0, up.stdout + up.stderr
    out = up.stdout
    assert "chat (qwen3-6-27b): 'Say hello to the fleet' finish=stop" in out
    assert "stream (qwen3-6-27b): Say hello to the fleet  [finish=stop]" in out
    assert "embed (minilm): 2 vectors of 384 dimensions" in out
    assert "health (local): live" in out
    assert "sample jobs done" in out
    assert "Flower: http://127.0.0.1:18555" in out
    assert flower == (401, 200), "Flower refuses anonymous requests and serves the authenticated user"


def _flower_answers(auth_file: Path, url: str) -> tuple[int, int]:
    """Flower's status without and with the generated credentials (it may take a moment to start)."""
    import time

    import httpx

    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            anonymous = httpx.get(f"{url}/api/workers", timeout=2).status_code
            user, _, password = auth_file.read_text().strip().partition(":")
            authenticated = httpx.get(f"{url}/api/workers", auth=(user, password), timeout=5).status_code
            return anonymous, authenticated
        except (httpx.HTTPError, FileNotFoundError):
            time.sleep(0.3)
    return 0, 0
