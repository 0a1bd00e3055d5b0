"""Liveness on real workers: a SIGKILLed worker costs seconds with the default settings; a hung user factory fails
its job (naming the task) while the fleet goes on; a redelivered dropout model computes the same on a worker with
another PYTHONHASHSEED.
"""

from __future__ import annotations

import signal
import time

import pytest

from storage import keys

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SPEC = {"shards": 2, "epochs": 1, "batch_size": 128, "seed": 7, "publish_every_versions": 0}  # 6 rounds
# The defaults a new user runs with: services_env shortens the visibility timeout and retries for other tests.
DEFAULTS = {"AAS_VISIBILITY_TIMEOUT_S": "600", "AAS_TASK_MAX_RETRIES": "5", "AAS_RETRY_BACKOFF_S": "1",
            "AAS_RETRY_BACKOFF_MAX_S": "30"}


def wait_for(cond, timeout_s: float, what: str, poll_s: float = 0.05):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(poll_s)
    raise AssertionError(f"{what}: not within {timeout_s} s")


def test_a_sigkilled_computing_worker_costs_seconds_not_the_visibility_timeout(workers) -> None:
    from pipeline.client import Client
    from storage.leases import LeaseBook

    slow = {**DEFAULTS, "AAS_SLOW_FACTOR": "60"}  # a shard task computes for ~1-2 s: the kill lands mid-task
    start = workers
    start("aggregator", "aggregate", extra_env=DEFAULTS)
    start("survivor", extra_env=slow)
    start("victim", extra_env=slow)
    client = Client()
    job_id = client.submit(SPEC)
    book = LeaseBook(client.redis, client.settings.lease_ttl_s)

    def victim_computing():
        if client.jobs.get(job_id).version < 1:
            return None  # let the first round pass: the kill lands in a steady-state round
        return next((lease for lease in book.leases(job_id) if lease.worker.startswith("victim@") and lease.alive),
                    None)

    lease = wait_for(victim_computing, 120, "the victim never computed a shard")
    version = client.jobs.get(job_id).version
    start.group.kill("victim", signal.SIGKILL)  # type: ignore[attr-defined]
    t_kill = time.monotonic()
    wait_for(lambda: client.jobs.get(job_id).version > version, 120, "no version after the kill")
    recovered_s = time.monotonic() - t_kill
    # Long before the visibility timeout (600 s) and the old watchdog (900 s): a lease expires in lease_ttl_s.
    assert recovered_s < 60, recovered_s
    final = client.wait(job_id, timeout=240)
    assert final["status"] == "succeeded", final.get("error")
    events = client.jobs.events(job_id, count=1000)
    relaunches = [e for e in events if e["kind"] == "relaunch"]
    assert any(e["slot"] == lease.slot and "lease lost" in e["reason"] for e in relaunches), events
    for v in range(1, final["version"] + 1):
        assert {keys.parse_identity(i).shard for i in client.jobs.consumed(job_id, v)} == {0, 1}


def test_shard_messages_the_broker_lost_are_relaunched_in_seconds_with_the_default_settings(workers) -> None:
    from pipeline.client import Client

    start = workers
    start("aggregator", "aggregate", extra_env=DEFAULTS)
    client = Client()
    job_id = client.submit(SPEC)
    wait_for(lambda: client.redis.llen("shards"), 10, "the round was never queued")
    assert client.redis.delete("shards") == 1  # the round's shard messages vanish, as kombu can lose them
    start("shard0", extra_env=DEFAULTS)
    final = client.wait(job_id, timeout=120)
    assert final["status"] == "succeeded", final.get("error")
    events = client.jobs.events(job_id, count=1000)
    assert {e["slot"] for e in events if e["kind"] == "relaunch" and "message lost" in e["reason"]} == {"v0:s0",
                                                                                                         "v0:s1"}
    assert not any(e["kind"] == "watchdog" for e in events)  # the 15-minute last resort was not needed


def test_a_user_factory_that_hangs_fails_its_job_naming_the_task_and_a_second_job_succeeds(
        workers, monkeypatch) -> None:
    from pipeline.client import Client
    from pipeline.settings import get_settings

    allow = {"AAS_ALLOWED_IMPORTS": "tests.assets"}  # the hanging factory is user code: allowlisted explicitly
    monkeypatch.setenv("AAS_ALLOWED_IMPORTS", "tests.assets")
    get_settings.cache_clear()
    hang = {"AAS_TEST_HANG": "1", "AAS_TASK_TIME_LIMIT_S": "3", "AAS_HARD_EXIT_GRACE_S": "1",
            "AAS_MAX_DELIVERIES": "2", **allow}
    start = workers
    start("aggregator", "aggregate", extra_env={"AAS_MAX_DELIVERIES": "2", **allow})
    start("shard-a", extra_env=hang, supervise=True)  # solo pool: Celery's own time limit does not apply
    start("shard-b", extra_env=hang, supervise=True)
    client = Client()
    bad = client.submit({**SPEC, "model": "tests.assets.hanging_model:factory"})
    final = client.wait(bad, timeout=180)
    assert final["status"] == "failed"
    assert f"of job {bad} v0" in final["error"] and "poison" in final["error"], final["error"]
    assert any(e["kind"] == "hung" for e in client.jobs.events(bad, count=1000))
    assert sum(start.group.restarts.values()) >= 2  # type: ignore[attr-defined]  # the hung workers ended

    good = client.submit(SPEC)
    final = client.wait(good, timeout=180)
    assert final["status"] == "succeeded", final.get("error")


def test_a_redelivered_dropout_shard_computes_the_same_on_a_worker_with_another_hash_seed(workers) -> None:
    from pipeline.checkpoint import decode_checkpoint
    from pipeline.client import Client

    spec = {"model": "char-lm", "model_args": {"n_layer": 1, "n_head": 2, "n_embd": 32, "block_size": 16,
                                               "dropout": 0.2},
            "dataset": "chars", "dataset_args": {"block_size": 16, "max_chars": 3_000}, "shards": 2, "epochs": 1,
            "batch_size": 32, "seed": 5, "publish_every_versions": 0}
    start = workers
    start("aggregator", "aggregate")
    start("one", extra_env={"PYTHONHASHSEED": "1"})
    client = Client()

    def weights(job_id: str):
        final = client.wait(job_id, timeout=300)
        assert final["status"] == "succeeded", final.get("error")
        v = final["version"]
        return decode_checkpoint(client.store.get(keys.checkpoint(job_id, v)), f"v{v}").state

    reference = weights(client.submit(spec))
    start.group.kill("one", signal.SIGTERM)  # type: ignore[attr-defined]
    # The victim computes a shard and dies before uploading it; the relaunch runs on a worker salted otherwise.
    start("victim", extra_env={"PYTHONHASHSEED": "2", "AAS_FAULTS": "shard.before_upload"})
    start("two", extra_env={"PYTHONHASHSEED": "3"})
    job_id = client.submit(spec)
    got = weights(job_id)
    assert client.redis.exists(keys.fault_fired("shard.before_upload", job_id)), "the fault never fired"
    assert got.keys() == reference.keys()
    for name in got:
        assert (got[name] - reference[name]).abs().max().item() <= 1e-6, name
