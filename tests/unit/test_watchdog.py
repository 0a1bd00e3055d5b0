"""The watchdog re-enqueues the work of a job that stopped moving (a message lost by the broker)."""

from __future__ import annotations

from pipeline.client import Client
from workers import lifecycle


def stage(unit_ctx, **spec) -> str:
    client = Client(unit_ctx.settings, store=unit_ctx.store, redis_client=unit_ctx.redis, dispatch=unit_ctx.dispatch)
    job_id = client.stage({"shards": 2, "epochs": 1, "batch_size": 512, **spec})
    unit_ctx.jobs.set_status(job_id, "running")
    return job_id


def test_a_stalled_sync_job_gets_its_round_relaunched_once_per_stall_period(unit_ctx) -> None:
    job_id = stage(unit_ctx)
    lifecycle.advance(unit_ctx, job_id)
    assert len(unit_ctx.dispatch.of("round")) == 1
    t0 = unit_ctx.jobs.get(job_id).num("progress_at")
    stall = lifecycle.stall_after_s(unit_ctx)
    assert lifecycle.watchdog_sweep(unit_ctx, now=t0 + stall / 2) == []
    assert lifecycle.watchdog_sweep(unit_ctx, now=t0 + stall + 1) == [job_id]
    assert lifecycle.watchdog_sweep(unit_ctx, now=t0 + stall + 2) == []  # not again until another stall
    rounds = unit_ctx.dispatch.of("round")
    assert len(rounds) == 2 and rounds[1] == rounds[0] == {"job_id": job_id, "version": 0, "shards": 2, "step": 0}
    assert any(e["kind"] == "watchdog" for e in unit_ctx.jobs.events(job_id))


def test_a_stalled_async_job_gets_every_shard_reissued_and_finished_jobs_are_left_alone(unit_ctx) -> None:
    job_id = stage(unit_ctx, mode="async")
    done = stage(unit_ctx)
    unit_ctx.jobs.set_status(done, "succeeded")
    t0 = unit_ctx.jobs.get(job_id).num("progress_at")
    lifecycle.advance(unit_ctx, job_id)
    sent = unit_ctx.dispatch.of("shard")
    assert len(sent) == 2  # a step per shard
    relaunched = lifecycle.watchdog_sweep(unit_ctx, now=t0 + lifecycle.stall_after_s(unit_ctx) + 1)
    assert relaunched == [job_id]
    sent = [(m["shard"], m["step"], m["version"], m["attempt"]) for m in unit_ctx.dispatch.of("shard")]
    assert len(sent) == 4 and [m[:3] for m in sent[2:]] == [m[:3] for m in sent[:2]]  # the same steps again,
    for shard_id in (0, 1):  # as new attempts: a blob key of their own
        attempts = [m[3] for m in sent if m[0] == shard_id]
        assert len(attempts) == len(set(attempts))
    assert unit_ctx.dispatch.of("round") == []  # the finished sync job was left alone
