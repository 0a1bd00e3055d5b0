"""The heartbeat check (workers/health.py) and the named task arguments Flower shows (workers/app.py)."""

from __future__ import annotations

import json
import time
from pathlib import Path


def test_a_fresh_heartbeat_is_healthy_and_names_the_running_task(tmp_path: Path) -> None:
    from workers.health import Heartbeat, check

    hb = Heartbeat(tmp_path / "h" / "w.health", "shard1@host", interval_s=60)
    hb.task, hb.task_since = "aas.train_shard", time.time() - 17
    hb.beat()
    ok, why = check(hb.path, max_age_s=30)
    assert ok and "running aas.train_shard for 17 s" in why
    hb.stop()
    assert not hb.path.exists()


def test_a_stale_missing_or_garbled_heartbeat_fails(tmp_path: Path) -> None:
    from workers.health import check, main

    path = tmp_path / "w.health"
    assert not check(path)[0] and "no heartbeat file" in check(path)[1]
    path.write_text(json.dumps({"pid": 1, "worker": "w@h", "at": time.time() - 100, "task": None}))
    ok, why = check(path, max_age_s=30)
    assert not ok and "100 s old" in why
    assert main(["--file", str(path), "--max-age", "30"]) == 1
    assert main(["--file", str(path), "--max-age", "300"]) == 0
    path.write_text("{not json")
    assert not check(path)[0]


def test_shard_tasks_travel_with_named_arguments_job_id_first() -> None:
    from pipeline.settings import Settings
    from workers.app import TASK_TRAIN_SHARD, make_app, shard_signature

    capp = make_app(Settings(redis_url="redis://127.0.0.1:1/0"))
    sig = shard_signature(capp, "2fcf045fe2cc", 2, 156, 156, 0)
    assert sig.task == TASK_TRAIN_SHARD and not sig.args
    assert list(sig.kwargs) == ["job_id", "shard_id", "version", "step", "attempt"]
    assert sig.kwargs["job_id"] == "2fcf045fe2cc" and sig.kwargs["shard_id"] == 2


def test_the_aggregate_message_keeps_job_and_version_legible_at_1000_shards() -> None:
    """Celery cuts argsrepr/kwargsrepr at 1 KB each (what Flower shows): the aggregation's results list is
    cut, but job id and version travel as kwargs, so they survive."""
    from pipeline.settings import Settings
    from workers.app import TASK_AGGREGATE, make_app

    capp = make_app(Settings(redis_url="redis://127.0.0.1:1/0"))
    results = [{"shard": s, "version": 7, "key": f"jobs/abc/grads/v000007/s{s:05d}-a0.aast", "sha256": "0" * 64}
               for s in range(1000)]
    msg = capp.amqp.as_task_v2("tid", TASK_AGGREGATE, args=[results], kwargs={"job_id": "abc123", "version": 7})
    headers = msg.headers
    assert len(headers["argsrepr"]) <= 1100
    assert "'job_id': 'abc123'" in headers["kwargsrepr"] and "'version': 7" in headers["kwargsrepr"]


def test_the_shard_worker_health_is_a_heartbeat_not_a_ping() -> None:
    import yaml

    services = yaml.safe_load((Path(__file__).resolve().parents[2] / "docker-compose.yml").read_text())["services"]
    for name, svc in services.items():
        cmd = " ".join(map(str, svc.get("command") or []))
        if "celery" in cmd and " worker " in f" {cmd} ":
            test = " ".join(svc["healthcheck"]["test"])
            assert "inspect ping" not in test, f"{name}: a busy solo worker never answers a ping"
            assert "workers.health" in test, f"{name}: healthcheck must read the heartbeat"
            assert svc["environment"]["AAS_HEALTH_FILE"], name
