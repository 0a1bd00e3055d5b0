"""Redis stays bounded: finished jobs' per-version keys expire, old finished jobs are forgotten, and the
registry keeps only the newest versions (plus aliased ones) per model."""

from __future__ import annotations

from typing import Any

from pipeline.client import Client
from storage import keys
from storage.jobstate import JobStore
from storage.retention import Retention
from workers import aggregator, shard
from workers.lifecycle import advance


def _run_job(unit_ctx: Any, run_published: Any) -> str:
    from pydantic import SecretStr

    # Every job publishes into the same model: registering into an existing model needs the registry token.
    # The workers (this Context) hold the same token, so they can check the job's grant when publishing.
    unit_ctx.settings = unit_ctx.settings.model_copy(update={"registry_token": SecretStr("retention-token")})
    client = Client(unit_ctx.settings, store=unit_ctx.store, redis_client=unit_ctx.redis, dispatch=unit_ctx.dispatch)
    job_id = client.stage({"shards": 2, "epochs": 1, "batch_size": 256, "seed": 1})
    unit_ctx.jobs.set_status(job_id, "running")
    v = 0
    while unit_ctx.jobs.get(job_id).status == "running":
        results = [shard.train_shard(unit_ctx, job_id, s, v, v, 0) for s in range(2)]
        assert aggregator.aggregate_round(unit_ctx, job_id, v, results).committed
        advance(unit_ctx, job_id)
        run_published(unit_ctx)
        v += 1
    assert unit_ctx.jobs.get(job_id).status == "succeeded"
    return job_id


def _persistent(r: Any) -> set[bytes]:
    return {k for k in r.keys("aas:*") if r.ttl(k) == -1}


def test_redis_key_count_stays_bounded_over_several_jobs(unit_ctx: Any, run_published: Any) -> None:
    unit_ctx.jobs = JobStore(unit_ctx.redis, Retention(finished_ttl_s=3600, keep_jobs=2))
    counts, jobs = [], []
    for _ in range(5):
        jobs.append(_run_job(unit_ctx, run_published))
        counts.append(len(_persistent(unit_ctx.redis)))
    assert counts[2] == counts[3] == counts[4], f"persistent keys grow with every job: {counts}"
    r = unit_ctx.redis
    # per-version keys of a finished job expire instead of staying forever
    last = jobs[-1]
    consumed = list(r.scan_iter(match=keys.job_consumed_pattern(last)))
    assert consumed and all(0 < r.ttl(k) <= 3600 for k in consumed)
    # only the newest two finished jobs keep their state; older ones are gone, index included
    assert [j for j in jobs if r.exists(keys.job(j))] == jobs[-2:]
    assert not list(r.scan_iter(match=f"aas:job:{jobs[0]}*"))
    assert set(unit_ctx.jobs.list(10)) == set(jobs[-2:])


def test_a_failed_job_keeps_what_resume_needs(unit_ctx: Any) -> None:
    r = unit_ctx.redis
    unit_ctx.jobs = JobStore(r, Retention(finished_ttl_s=0, keep_jobs=0))
    r.hset(keys.job("j1"), mapping={"spec": "{}", "status": "running", "version": 2})
    r.sadd(keys.job_consumed("j1", 1), "x")
    r.hset(keys.job_progress("j1"), "0", "4")
    unit_ctx.jobs.set_status("j1", "failed", error="boom")
    assert not r.exists(keys.job_consumed("j1", 1)) and r.exists(keys.job_progress("j1"))
    r.hset(keys.job("j2"), mapping={"spec": "{}", "status": "running", "version": 2})
    r.hset(keys.job_progress("j2"), "0", "4")
    unit_ctx.jobs.set_status("j2", "succeeded")
    assert not r.exists(keys.job_progress("j2"))

