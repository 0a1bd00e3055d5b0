"""The watchdog re-enqueues the work of a job that stopped moving (a message lost by the broker)."""

from __future__ import annotations

from unittest import mock

from pipeline.client import Client
from workers import async_agg, tasks


def stage(unit_ctx, **spec) -> str:
    client = Client(unit_ctx.settings, store=unit_ctx.store, redis_client=unit_ctx.redis)
    job_id = client.stage({"shards": 2, "epochs": 1, "batch_size": 512, **spec})
    unit_ctx.jobs.set_status(job_id, "running")
    return job_id


def test_a_stalled_sync_job_gets_its_round_relaunched_once_per_stall_period(unit_ctx) -> None:
    job_id = stage(unit_ctx)
    t0 = unit_ctx.jobs.get(job_id).num("progress_at")
    stall = tasks.stall_after_s(unit_ctx)
    with mock.patch.object(tasks, "launch_round") as launch:
        assert tasks.watchdog_sweep(unit_ctx, now=t0 + stall / 2) == []
        assert tasks.watchdog_sweep(unit_ctx, now=t0 + stall + 1) == [job_id]
        assert tasks.watchdog_sweep(unit_ctx, now=t0 + stall + 2) == []  # not again until another stall
    launch.assert_called_once()
    assert launch.call_args.kwargs == {"force": True} and launch.call_args.args[3] == 0
    assert any(e["kind"] == "watchdog" for e in unit_ctx.jobs.events(job_id))


def test_a_stalled_async_job_gets_every_shard_reissued_and_finished_jobs_are_left_alone(unit_ctx) -> None:
    job_id = stage(unit_ctx, mode="async")
    done = stage(unit_ctx)
    unit_ctx.jobs.set_status(done, "succeeded")
    sent: list[tuple] = []
    t0 = unit_ctx.jobs.get(job_id).num("progress_at")
    with mock.patch.object(async_agg, "enqueue_shard", lambda ctx, *a: sent.append(a)):
        async_agg.advance_async(unit_ctx, job_id)
        assert len(sent) == 2
        relaunched = tasks.watchdog_sweep(unit_ctx, now=t0 + tasks.stall_after_s(unit_ctx) + 1)
    assert relaunched == [job_id]
    assert len(sent) == 4 and sent[2:] == sent[:2]  # the same steps again, on the newest version
