"""Shard-to-worker affinity on real `celery worker` processes: a top-k job's shards stay on the workers that hold
their error-feedback state (on Redis and on RabbitMQ); when such a worker dies its shard moves to a live one, every
version is committed exactly once, and with the state in the store the weights equal a fault-free run's."""

from __future__ import annotations

import signal
import socket
import time
from collections import defaultdict
from typing import Any

import pytest

from storage import keys
from storage.leases import shard_results

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SPEC = {"shards": 2, "epochs": 1, "batch_size": 64, "seed": 3, "codec": "topk", "publish_every_versions": 0}


def shard_runs(r: Any, job_id: str) -> dict[int, dict[int, str]]:
    """shard → {data step: the worker node that ran it}, from the shard tasks' results."""
    out: dict[int, dict[int, str]] = defaultdict(dict)
    for res in shard_results(r, job_id):
        if "key" in res:
            out[int(res["shard"])][int(res["step"])] = str(res["worker"]).split("@", 1)[0]
    return out


@pytest.fixture
def on_rabbitmq(rabbitmq_url: str, services_env: dict[str, str], monkeypatch: pytest.MonkeyPatch):
    """RabbitMQ as the broker, with the shard workers' own queues of this test deleted before and after."""
    from kombu import Connection

    from pipeline.settings import get_settings
    from workers.app import affinity_queue_name

    def delete_own_queues() -> None:
        with Connection(rabbitmq_url, connect_timeout=3) as conn:
            for name in ("shard0", "shard1"):
                ch = conn.channel()
                try:
                    ch.queue_delete(affinity_queue_name(f"{name}@{socket.gethostname()}"))
                finally:
                    ch.close()

    monkeypatch.setenv("AAS_BROKER_URL", rabbitmq_url)
    get_settings.cache_clear()
    delete_own_queues()
    yield {"AAS_BROKER_URL": rabbitmq_url}
    delete_own_queues()


def test_a_top_k_jobs_shards_stay_on_the_workers_holding_their_state(workers) -> None:
    shards_stay_on_their_workers(workers, {})


def test_on_rabbitmq_a_top_k_jobs_shards_stay_on_their_workers_through_quorum_queues(on_rabbitmq, workers) -> None:
    from kombu import Connection

    shards_stay_on_their_workers(workers, on_rabbitmq)
    with Connection(on_rabbitmq["AAS_BROKER_URL"]) as conn:  # each worker's own queue is a quorum queue too
        ch = conn.channel()
        with pytest.raises(Exception, match="PRECONDITION_FAILED|inequivalent arg"):
            ch.queue_declare(f"shards.shard0@{socket.gethostname()}", durable=True,
                             arguments={"x-queue-type": "classic"})


def shards_stay_on_their_workers(workers, env: dict[str, str]) -> None:
    from pipeline.client import Client

    workers("aggregator", "aggregate", extra_env=env)
    workers("shard0", extra_env=env)
    workers("shard1", extra_env=env)
    client = Client()
    assert client.settings.broker_kind() == ("rabbitmq" if env else "redis")
    job_id = client.submit(SPEC)
    final = client.wait(job_id, timeout=240)
    assert final["status"] == "succeeded", final.get("error")
    rounds = final["version"]
    runs = shard_runs(client.redis, job_id)
    assert sorted(runs) == [0, 1] and all(len(runs[s]) == rounds for s in runs), runs
    # Round 0 goes to the shared queue (nobody holds anything yet); round 1 may hand one shard back when one worker
    # took both. From round 2 on (H=1: step = round) every shard runs where its state is, one worker per shard.
    steady = {s: {w for step, w in runs[s].items() if step >= 2} for s in runs}
    assert all(len(ws) == 1 for ws in steady.values()) and steady[0] != steady[1], runs
    assert final["state_local"] >= 2 * (rounds - 2) and final["state_moved"] <= 2, final
    for v in range(1, rounds + 1):
        assert {keys.parse_identity(i).shard for i in client.jobs.consumed(job_id, v)} == {0, 1}


def final_state(client, job_id: str) -> dict[str, Any]:
    from pipeline.checkpoint import decode_checkpoint

    v = client.jobs.get(job_id).version
    return decode_checkpoint(client.store.get(keys.checkpoint(job_id, v)), f"v{v}").state


def test_an_async_top_k_jobs_shards_stay_on_their_workers(workers) -> None:
    from pipeline.client import Client

    workers("aggregator", "aggregate")
    workers("shard0")
    workers("shard1")
    client = Client()
    job_id = client.submit({**SPEC, "mode": "async", "max_staleness": 8})
    final = client.wait(job_id, timeout=240)
    assert final["status"] == "succeeded", final.get("error")
    runs = shard_runs(client.redis, job_id)
    steady = {s: {w for step, w in runs[s].items() if step >= 2} for s in runs}
    assert sorted(steady) == [0, 1] and all(len(ws) == 1 for ws in steady.values()) and steady[0] != steady[1], runs
    assert final["state_moved"] <= 2, final


def test_when_the_worker_holding_a_shard_dies_the_shard_moves_and_the_weights_match_a_fault_free_run(workers) -> None:
    from pipeline.client import Client

    spec = {**SPEC, "codec_state": "store"}  # exact state: the weights must not depend on the kill
    slow = {"AAS_SLOW_FACTOR": "20"}  # a shard task computes for about a second: the kill lands mid-job
    workers("aggregator", "aggregate")
    workers("survivor", extra_env=slow)
    workers("victim", extra_env=slow)
    client = Client()
    clean = client.wait(client.submit(spec), timeout=240)
    assert clean["status"] == "succeeded", clean.get("error")
    job_id = client.submit(spec)
    deadline = time.monotonic() + 120
    while not any("victim" in v.decode() for v in client.redis.hvals(keys.job_affinity(job_id))):
        assert time.monotonic() < deadline, "the victim never held a shard"
        time.sleep(0.05)
    workers.group.kill("victim", signal.SIGKILL)  # type: ignore[attr-defined]
    version = client.jobs.get(job_id).version
    final = client.wait(job_id, timeout=240)
    assert final["status"] == "succeeded", final.get("error")
    runs = shard_runs(client.redis, job_id)
    late = {w for s in runs for step, w in runs[s].items() if step > version + 1}  # H=1: step = round
    assert late == {"survivor"}, runs  # the dead worker's shard came back to the live one
    assert final["version"] == clean["version"]
    for v in range(1, final["version"] + 1):
        assert {keys.parse_identity(i).shard for i in client.jobs.consumed(job_id, v)} == {0, 1}
    reference, got = final_state(client, clean["job_id"]), final_state(client, job_id)
    assert reference.keys() == got.keys()
    for name in reference:
        assert (reference[name] - got[name]).abs().max().item() <= 1e-6, name
