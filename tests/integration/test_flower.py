"""Flower on a real worker: the worker and its shard tasks, with named arguments, in its API and in a browser."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.integration

USER, PASSWORD = "ops", "flower-test-pass"


def _wait_http(url: str, auth: tuple[str, str], timeout_s: float = 40.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, auth=auth, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise AssertionError(f"Flower did not answer {url} within {timeout_s} s")


def _finished_shard_task(base: str, job_id: str, timeout_s: float = 15.0) -> dict[str, Any]:
    """Flower applies events as they stream in; poll briefly until the task's success has arrived."""
    import httpx

    deadline = time.monotonic() + timeout_s
    tasks: dict[str, Any] = {}
    while time.monotonic() < deadline:
        tasks = httpx.get(f"{base}/api/tasks", params={"taskname": "aas.train_shard", "state": "SUCCESS"},
                          auth=(USER, PASSWORD), timeout=5).json()
        for t in tasks.values():
            if job_id in str(t.get("kwargs")):
                return dict(t)
        time.sleep(0.3)
    raise AssertionError(f"no finished aas.train_shard of job {job_id} in Flower's /api/tasks: {tasks}")


def test_flower_shows_the_worker_and_a_finished_shard_task_with_readable_args(workers: Any,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    import httpx

    from pipeline.client import Client
    from pipeline.client.processes import free_port
    from pipeline.settings import Settings

    creds = {"AAS_FLOWER_USER": USER, "AAS_FLOWER_PASSWORD": PASSWORD}
    for k, v in creds.items():
        monkeypatch.setenv(k, v)
    port = free_port()
    group = workers("w1", "shards,aggregate")  # one real worker on both queues, events on (-E)
    flower = group.start("flower", [sys.executable, "-m", "pipeline.client.cli", "flower", "--port", str(port),
                                    "--address", "127.0.0.1"], creds)
    base = f"http://127.0.0.1:{port}"
    _wait_http(f"{base}/api/workers", (USER, PASSWORD))
    cmdline = Path(f"/proc/{flower.pid}/cmdline").read_bytes().decode(errors="replace")
    assert PASSWORD not in cmdline, "credentials must not appear in the process list"

    assert httpx.get(f"{base}/api/workers", timeout=5).status_code == 401
    assert httpx.get(f"{base}/api/tasks", auth=(USER, "wrong"), timeout=5).status_code == 401

    client = Client(Settings())
    job_id = client.submit({"shards": 1, "epochs": 1, "batch_size": 512})
    final = client.wait(job_id, timeout=60)
    assert final["status"] == "succeeded", final

    task = _finished_shard_task(base, job_id)
    assert task["name"] == "aas.train_shard" and task["state"] == "SUCCESS"
    assert task["worker"].startswith("w1@")
    # named arguments (job id, shard, version, step, attempt), not an unnamed tuple
    assert f"'job_id': '{job_id}'" in task["kwargs"] and "'shard_id': 0" in task["kwargs"]
    assert "'version': " in task["kwargs"] and task["args"] in ("()", "[]")

    found = httpx.get(f"{base}/api/workers", params={"refresh": "1"}, auth=(USER, PASSWORD), timeout=15).json()
    assert any(name.startswith("w1@") for name in found), found


def _running_shard_task(base: str, job_id: str, timeout_s: float = 90.0) -> dict[str, Any]:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        tasks = httpx.get(f"{base}/api/tasks", params={"taskname": "aas.train_shard", "state": "STARTED"},
                          timeout=5).json()
        for t in tasks.values():
            if job_id in str(t.get("kwargs")):
                return dict(t)
        time.sleep(0.3)
    raise AssertionError(f"no running aas.train_shard of job {job_id} in Flower within {timeout_s} s")


def test_flower_in_a_browser_shows_a_running_shard_task_with_job_shard_and_version(
        workers: Any, chromium: str, tmp_path: Path) -> None:
    """What an operator sees: Flower's task list, rendered by headless Chromium (its rows come from
    JavaScript), shows the shard task while it runs, with its job id, shard and version."""
    from pipeline.client import Client
    from pipeline.client.processes import free_port
    from pipeline.settings import Settings

    port = free_port()
    # Shard compute stretched (a sleep) so the task is still running when the browser looks.
    group = workers("w1", "shards,aggregate", extra_env={"AAS_SLOW_FACTOR": "100", "AAS_VISIBILITY_TIMEOUT_S": "300"})
    group.start("flower", [sys.executable, "-m", "pipeline.client.cli", "flower", "--port", str(port),
                           "--address", "127.0.0.1", "--no-auth"], {"FLOWER_UNAUTHENTICATED_API": "1"})
    base = f"http://127.0.0.1:{port}"
    _wait_http(f"{base}/api/workers", ("", ""))
    client = Client(Settings())
    job_id = client.submit({"shards": 1, "epochs": 1, "batch_size": 512})
    try:
        task = _running_shard_task(base, job_id)
        dom = subprocess.run(
            [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
             f"--user-data-dir={tmp_path / 'chromium'}", "--virtual-time-budget=15000", "--dump-dom",
             f"{base}/tasks"], capture_output=True, text=True, timeout=120).stdout
        row = next((line for line in dom.split("<tr") if job_id in line and "aas.train_shard" in line), "")
        assert row, f"no row of job {job_id} in Flower's task list:\n{dom[-3000:]}"
        assert "STARTED" in row, row
        assert "&#39;shard_id&#39;: 0" in row or "'shard_id': 0" in row, row
        version = task["kwargs"].split("'version': ")[1].split(",")[0]
        assert f"version&#39;: {version}" in row or f"'version': {version}" in row, row
    finally:
        client.cancel(job_id)
