"""Flower on a real worker: the worker and a finished shard task, with readable arguments, show in its API."""

from __future__ import annotations

import ast
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
            if job_id in str(t.get("args")):
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
    # args (job id, shard, version, step, attempt) are readable plain values, not an opaque blob
    job, shard, version, _step, _attempt = ast.literal_eval(task["args"])
    assert (job, shard) == (job_id, 0) and 0 <= version < final["version"]

    found = httpx.get(f"{base}/api/workers", params={"refresh": "1"}, auth=(USER, PASSWORD), timeout=15).json()
    assert any(name.startswith("w1@") for name in found), found
