"""The worker healthcheck tells a busy worker from a dead one (workers/health.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
TASK_S = 40.0
MAX_AGE_S = 12
MARGIN_S = 14.0  # no check starts later than this before the task's end: a check is a new interpreter, slow under load


def _check(env: dict[str, str], *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "workers.health", *extra], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=30)


def _wait(cond: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def test_the_healthcheck_passes_while_a_solo_worker_runs_a_40_s_task(redis_url: str, tmp_path: Path) -> None:
    from pipeline.client.processes import ProcessGroup, wait_for_workers, worker_argv
    from pipeline.settings import Settings
    from workers.app import app_for

    health = tmp_path / "worker.health"
    env = {**os.environ, "AAS_REDIS_URL": redis_url, "AAS_HEALTH_FILE": str(health), "AAS_INSECURE_DEV": "1",
           "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'tests' / 'integration'}"}
    argv = worker_argv("busy", "sleepy")
    argv[argv.index("workers.app")] = "slow_task_app"
    group = ProcessGroup(env=env, cwd=REPO, logdir=tmp_path / "logs")
    try:
        group.start("busy", argv)
        capp = app_for(Settings(redis_url=redis_url))
        wait_for_workers(capp, ["busy"], timeout_s=90)
        _wait(health.exists, 30, "the first heartbeat")
        assert _check(env).returncode == 0

        capp.send_task("tests.sleep", args=[TASK_S], queue="sleepy")
        _wait(lambda: json.loads(health.read_text()).get("task") == "tests.sleep", 30, "the task to start")
        started = time.monotonic()
        # The contrast: the control ping the old healthcheck used goes unanswered by a busy solo worker.
        assert not capp.control.ping(destination=[json.loads(health.read_text())["worker"]], timeout=2)
        passed_at = []  # seconds into the task at which each passing check started
        while (at := time.monotonic() - started) < TASK_S - MARGIN_S:
            done = _check(env, "--max-age", str(MAX_AGE_S))
            assert done.returncode == 0, done.stderr
            assert "running tests.sleep" in done.stdout
            passed_at.append(at)
            time.sleep(6)
        # A check passed more than --max-age into the task: the heartbeat was renewed while the task ran (a count
        # of checks would depend on how long each takes to start on a loaded machine).
        assert len(passed_at) >= 2 and passed_at[-1] > MAX_AGE_S, passed_at
        assert json.loads(health.read_text())["task"] == "tests.sleep", "the task ended early: the test proves nothing"
        _wait(lambda: json.loads(health.read_text()).get("task") is None, TASK_S + 30, "the task to end")
        assert "idle" in _check(env).stdout

        group.kill("busy")  # a dead worker stops beating and fails the check once its heartbeat ages
        time.sleep(2.5)
        stale = _check(env, "--max-age", "2")
        assert stale.returncode == 1 and "old" in stale.stderr
    finally:
        group.close()

