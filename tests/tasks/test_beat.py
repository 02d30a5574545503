"""Celery Beat, started for real with a short interval, makes every worker refresh its instances."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.tasks.conftest import Fleet, wait_for


def test_beat_triggers_discovery_on_every_worker(fleet: Fleet, tmp_path: Path) -> None:
    settings = fleet.settings.model_copy(update={"discovery_interval_s": 1.0})
    env = {**os.environ, **settings.to_env()}
    baseline = fleet.simulator.stats()["requests"].get("models", 0)
    beat = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "tasks.app", "beat", "-s", str(tmp_path / "schedule"), "-l", "WARNING"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(
            lambda: fleet.simulator.stats()["requests"].get("models", 0) >= baseline + 2,
            timeout_s=20,
            what="two discovery refreshes reaching the instance",
        )
    finally:
        beat.terminate()
        _, err = beat.communicate(timeout=15)
    assert "Traceback" not in err, err


def test_beat_schedule_uses_the_configured_interval(fleet: Fleet) -> None:
    from beat_schedule import REFRESH_TASK, build_beat_schedule

    entry = build_beat_schedule(fleet.settings.model_copy(update={"discovery_interval_s": 42.0}))
    (only,) = entry.values()
    assert only["task"] == REFRESH_TASK
    assert only["schedule"] == 42.0
    assert only["kwargs"] == {"instance": "all"}
