"""The liveness monitor on fakeredis and the StubDispatcher: which slots it relaunches, when, and when it gives up."""

from __future__ import annotations

import base64
import json

from pipeline.client import Client
from storage import keys
from storage.leases import RESULTS_TTL_S, LeaseBook, round_results
from workers import lifecycle, liveness
from workers.liveness import Queued


class Probe:
    """Stands in for the broker: what `queued` says is waiting."""

    def __init__(self) -> None:
        self.queued = Queued()

    def snapshot(self) -> Queued:
        return self.queued


def stage(unit_ctx, **spec) -> str:
    client = Client(unit_ctx.settings, store=unit_ctx.store, redis_client=unit_ctx.redis, dispatch=unit_ctx.dispatch)
    job_id = client.stage({"shards": 2, "epochs": 1, "batch_size": 512, **spec})
    lifecycle.advance(unit_ctx, job_id)
    unit_ctx.dispatch.sent.clear()
    return job_id


def book(unit_ctx) -> LeaseBook:
    return liveness.book_of(unit_ctx)


def kinds(unit_ctx, job_id: str) -> list[str]:
    return [e["kind"] for e in unit_ctx.jobs.events(job_id)]


def test_a_shard_whose_worker_died_is_relaunched_at_once_and_only_that_shard(unit_ctx) -> None:
    job_id = stage(unit_ctx, shards=3)
    b = book(unit_ctx)
    for s in range(3):
        b.acquire(job_id, f"t{s}", keys.slot_shard(0, s), "w@host/1", f"shard {s} of job {job_id} v0")
    unit_ctx.redis.delete(keys.lease("t1"))  # the worker running shard 1 stopped renewing: its lease expired
    actions = liveness.sweep(unit_ctx, Probe(), now=1000.0)
    assert [(a.kind, a.slot) for a in actions] == [("relaunch", "v0:s1")]
    assert "lease lost" in actions[0].reason
    [sent] = unit_ctx.dispatch.of("shard")
    assert sent == {"job_id": job_id, "shard": 1, "version": 0, "step": 0, "attempt": 1, "apply": False}
    assert {"lease_lost", "relaunch"} <= set(kinds(unit_ctx, job_id))
    assert b.lost_count(job_id, "v0:s1") == 1


def test_work_that_is_neither_queued_leased_nor_done_is_relaunched_after_the_grace_not_before(unit_ctx) -> None:
    stage(unit_ctx)
    probe, grace = Probe(), unit_ctx.settings.relaunch_grace_s
    assert liveness.sweep(unit_ctx, probe, now=1000.0) == []  # first seen orphaned
    assert liveness.sweep(unit_ctx, probe, now=1000.0 + grace / 2) == []
    actions = liveness.sweep(unit_ctx, probe, now=1000.0 + grace)
    assert sorted(a.slot for a in actions) == ["v0:s0", "v0:s1"] and "message lost" in actions[0].reason
    assert [m["shard"] for m in unit_ctx.dispatch.of("shard")] == [0, 1]


def test_queued_or_leased_work_is_left_alone(unit_ctx) -> None:
    job_id = stage(unit_ctx)
    probe = Probe()
    probe.queued.slots.add((job_id, "v0:s0"))
    book(unit_ctx).acquire(job_id, "t1", "v0:s1", "w@host/1", "shard 1")
    for t in (1000.0, 1010.0, 1100.0):
        assert liveness.sweep(unit_ctx, probe, now=t) == []
    assert unit_ctx.dispatch.sent == []


def test_on_rabbitmq_a_busy_queue_may_hold_the_work_and_an_empty_one_does_not(unit_ctx) -> None:
    stage(unit_ctx)
    probe = Probe()
    probe.queued.busy.add("shards")  # RabbitMQ: messages are waiting, whose is unknown
    assert liveness.sweep(unit_ctx, probe, now=1000.0) == []
    assert liveness.sweep(unit_ctx, probe, now=1100.0) == []
    probe.queued.busy.clear()
    liveness.sweep(unit_ctx, probe, now=1200.0)
    assert len(liveness.sweep(unit_ctx, probe, now=1300.0)) == 2


def test_a_round_whose_shards_are_done_but_whose_aggregation_never_came_gets_one(unit_ctx) -> None:
    job_id = stage(unit_ctx)
    b = book(unit_ctx)
    assert b.mark_done(job_id, 0, 0) == (1, True, None)
    assert b.mark_done(job_id, 0, 1) == (2, True, None)
    probe = Probe()
    probe.queued.slots.add((job_id, "v0:agg"))  # the aggregation is queued: fine
    assert liveness.sweep(unit_ctx, probe, now=1000.0) == []
    probe.queued.slots.clear()  # ... and then lost
    liveness.sweep(unit_ctx, probe, now=1001.0)
    actions = liveness.sweep(unit_ctx, probe, now=1001.0 + unit_ctx.settings.relaunch_grace_s)
    assert [a.slot for a in actions] == ["v0:agg"]
    assert unit_ctx.dispatch.of("aggregate") == [{"job_id": job_id, "version": 0}]
    assert unit_ctx.dispatch.of("shard") == []


def test_the_shard_that_completes_a_round_sends_its_aggregation_once_and_records_the_rounds_results(unit_ctx) -> None:
    job_id = stage(unit_ctx)
    r0 = {"shard": 0, "version": 0, "key": "k0", "sha256": "d0"}
    r1 = {"shard": 1, "version": 0, "key": "k1", "sha256": "d1"}
    liveness.shard_finished(unit_ctx, job_id, 0, 0, attempt=0, result=r0)
    assert unit_ctx.dispatch.of("aggregate") == []  # the round is not complete
    liveness.shard_finished(unit_ctx, job_id, 1, 0, attempt=0, result=r1)
    assert unit_ctx.dispatch.of("aggregate") == [{"job_id": job_id, "version": 0}]
    assert round_results(unit_ctx.redis, job_id, 0) == [r0, r1]  # what the aggregation reads
    assert 0 < unit_ctx.redis.ttl(keys.job_results(job_id, 0)) <= RESULTS_TTL_S  # a fast job leaves them briefly
    # The same shard delivered again (its worker died before the ack): the round was already complete.
    liveness.shard_finished(unit_ctx, job_id, 1, 0, attempt=0, result=r1)
    assert len(unit_ctx.dispatch.of("aggregate")) == 1


def test_the_last_relaunched_shard_of_a_round_sends_the_aggregation_itself(unit_ctx) -> None:
    job_id = stage(unit_ctx)
    liveness.shard_finished(unit_ctx, job_id, 0, 0, attempt=0)
    liveness.shard_finished(unit_ctx, job_id, 1, 0, attempt=0)
    assert len(unit_ctx.dispatch.of("aggregate")) == 1
    # Shard 1 recomputed (its blob was rejected): the round is still complete, so its new blob is aggregated.
    liveness.shard_finished(unit_ctx, job_id, 1, 0, attempt=3)
    assert unit_ctx.dispatch.of("aggregate")[1] == {"job_id": job_id, "version": 0}


def test_a_task_whose_workers_keep_dying_fails_the_job_with_a_reason_naming_it(unit_ctx) -> None:
    job_id = stage(unit_ctx)
    other = stage(unit_ctx)
    b = book(unit_ctx)
    what = f"shard 0 of job {job_id} v0"
    limit = unit_ctx.settings.max_deliveries
    for n in range(limit):
        b.acquire(job_id, f"t{n}", "v0:s0", f"w{n}@host/1", what)
        b.mark_hung(job_id, f"t{n}")  # the worker ended itself past the hard limit
        b.acquire(other, f"o{n}", "v0:s0", f"w{n}@host/1", "shard 0 of the other job")
        liveness.sweep(unit_ctx, Probe(), now=1000.0 + n)
    job = unit_ctx.jobs.get(job_id)
    assert job.status == "failed"
    assert what in job.error and "poison" in job.error and "hard time limit" in job.error
    assert unit_ctx.jobs.get(other).status == "running"  # its leases are alive: nothing wrong there
    assert len([m for m in unit_ctx.dispatch.of("shard") if m["job_id"] == job_id and m["shard"] == 0]) == limit - 1


def test_an_async_job_gets_exactly_its_missing_steps_reissued(unit_ctx) -> None:
    job_id = stage(unit_ctx, mode="async", batch_size=64)  # 14 steps per shard
    unit_ctx.redis.hset(keys.job_progress(job_id), mapping={"0": 3, "1": 2})
    probe = Probe()
    probe.queued.slots.add((job_id, keys.slot_step(0, 3)))
    liveness.sweep(unit_ctx, probe, now=1000.0)
    actions = liveness.sweep(unit_ctx, probe, now=1000.0 + unit_ctx.settings.relaunch_grace_s)
    # In flight should be the first 2 steps not accepted, in the global order: (1, 2), (0, 3).
    assert [a.slot for a in actions] == ["s1:t2"]
    assert unit_ctx.dispatch.of("shard") == [{"job_id": job_id, "shard": 1, "version": lifecycle.NEWEST, "step": 2,
                                              "attempt": 1, "apply": True}]  # attempt 0: its step 0, at the start


def test_a_hung_task_ends_its_worker_process_and_is_relaunched_elsewhere_at_once(unit_ctx) -> None:
    job_id = stage(unit_ctx)
    clock = [0.0]
    exits: list[int] = []
    agent = liveness.WorkerAgent(book(unit_ctx), "w@host/7", interval_s=1.0, hard_limit_s=10.0,
                                 exit_fn=exits.append, clock=lambda: clock[0])
    agent.begin(job_id, "t0", "v0:s0", f"shard 0 of job {job_id} v0")
    clock[0] = 9.0
    agent.tick()
    assert exits == [] and book(unit_ctx).workers()["w@host/7"]["tasks"][0]["running_s"] == 9.0
    clock[0] = 10.5
    agent.tick()
    assert exits == [liveness.EXIT_HUNG]
    assert "w@host/7" not in book(unit_ctx).workers()
    actions = liveness.sweep(unit_ctx, Probe(), now=1000.0)
    assert [a.slot for a in actions if a.kind == "relaunch"] == ["v0:s0"]
    assert "hung" in actions[0].reason


def test_a_retry_countdown_holds_the_lease_and_a_finished_task_releases_it(unit_ctx) -> None:
    job_id = stage(unit_ctx)
    agent = liveness.WorkerAgent(book(unit_ctx), "w@host/7", interval_s=1.0, hard_limit_s=10.0)
    agent.begin(job_id, "t0", "v0:s0", "shard 0")
    agent.hold(job_id, "t0", 30.0)
    assert agent.running == {}
    [lease] = book(unit_ctx).leases(job_id)
    assert lease.state == "retry" and lease.alive
    assert unit_ctx.redis.pttl(keys.lease("t0")) > 30_000
    agent.begin(job_id, "t0", "v0:s0", "shard 0")
    agent.end(job_id, "t0")
    assert book(unit_ctx).leases(job_id) == []


def test_a_job_whose_redis_state_was_lost_is_rebuilt_from_the_store_and_relaunched(unit_ctx) -> None:
    job_id = stage(unit_ctx)
    probe = Probe()
    probe.queued.slots |= {(job_id, "v0:s0"), (job_id, "v0:s1")}
    liveness._mirrored = None
    assert liveness.sweep(unit_ctx, probe, now=1000.0) == []
    assert json.loads(unit_ctx.store.get(keys.live_jobs())) == [job_id]
    unit_ctx.redis.flushall()  # Redis restarted empty: job state, queues, everything
    actions = liveness.sweep(unit_ctx, Probe(), now=1001.0)
    assert [a.kind for a in actions] == ["resumed"]
    job = unit_ctx.jobs.get(job_id)
    assert job.status == "running" and job.version == 0
    assert unit_ctx.dispatch.of("round") == [{"job_id": job_id, "version": 0, "shards": 2, "step": 0}]
    assert "resumed" in kinds(unit_ctx, job_id)


def test_a_job_submitted_since_the_last_sweep_is_rebuilt_too(unit_ctx) -> None:
    """Redis lost its state before any sweep listed the job: its submit-time marker names it."""
    liveness._mirrored = None
    assert liveness.sweep(unit_ctx, Probe(), now=1000.0) == []  # nothing running yet
    job_id = stage(unit_ctx)  # submitted after that sweep
    assert json.loads(unit_ctx.store.get(keys.live_jobs())) == []
    unit_ctx.redis.flushall()
    actions = liveness.sweep(unit_ctx, Probe(), now=1001.0)
    assert [(a.job_id, a.kind) for a in actions] == [(job_id, "resumed")]
    assert unit_ctx.jobs.get(job_id).status == "running"
    assert unit_ctx.dispatch.of("round") == [{"job_id": job_id, "version": 0, "shards": 2, "step": 0}]


def test_the_marker_of_an_ended_job_is_removed_and_an_unknown_one_kept(unit_ctx) -> None:
    liveness._mirrored = None
    ended, running = stage(unit_ctx), stage(unit_ctx)
    unit_ctx.store.put(keys.live_marker("beingsubmit"), b"")  # marker written, Redis not yet told
    unit_ctx.jobs.set_status(running, "running")
    unit_ctx.jobs.set_status(ended, "succeeded")
    probe = Probe()
    probe.queued.slots |= {(running, "v0:s0"), (running, "v0:s1")}
    liveness.sweep(unit_ctx, probe, now=1000.0)
    assert sorted(liveness._live_markers(unit_ctx)) == sorted(["beingsubmit", running])


def test_queued_redis_messages_are_read_as_job_slots() -> None:
    def message(task: str, args: list, kwargs: dict) -> bytes:
        body = base64.b64encode(json.dumps([args, kwargs, {}]).encode()).decode()
        return json.dumps({"body": body, "headers": {"task": task, "id": "x"},
                           "properties": {"body_encoding": "base64"}}).encode()

    parse = liveness.parse_redis_message
    assert parse(message("aas.train_shard", ["j1", 1, 4, 4, 0], {})) == ("j1", "v4:s1")
    assert parse(message("aas.train_shard", ["j1", 1, -1, 9, 2], {})) == ("j1", "s1:t9")
    assert parse(message("aas.aggregate", [[]], {"job_id": "j1", "version": 4})) == ("j1", "v4:agg")
    assert parse(message("aas.aggregate", [[], "j1", 4], {})) == ("j1", "v4:agg")
    assert parse(message("aas.apply_update", [{"shard": 0, "step": 7, "key": "k"}], {"job_id": "j1"})) == ("j1",
                                                                                                         "s0:t7")
    assert parse(message("aas.predict", ["m", "production", []], {})) is None
    assert parse(b"not json") is None


def test_top_and_status_show_time_since_progress_tasks_and_where_they_run_and_relaunches(unit_ctx) -> None:
    from pipeline.client.top import collect, render

    job_id = stage(unit_ctx)
    unit_ctx.jobs.set_status(job_id, "running")
    book(unit_ctx).acquire(job_id, "t0", "v0:s0", "shard0@host/12", f"shard 0 of job {job_id} v0")
    book(unit_ctx).acquire(job_id, "t1", "v0:s1", "shard1@host/13", f"shard 1 of job {job_id} v0")
    unit_ctx.redis.delete(keys.lease("t1"))
    liveness.sweep(unit_ctx, Probe())
    book(unit_ctx).acquire(job_id, "t2", "v0:s1", "shard1@host/14", f"shard 1 of job {job_id} v0")
    frame = render(collect(unit_ctx.redis, None, depths=lambda: {"shards": 4, "aggregate": 0}))
    assert "shards 4" in frame
    assert "s ago" in frame and f"shard 0 of job {job_id} v0" in frame and "shard0@host/12" in frame
    assert "shard1@host/14" in frame
    row = next(line for line in frame.splitlines() if line.strip().startswith(job_id))
    assert row.split()[-1] == "1"  # one relaunch

    client = Client(unit_ctx.settings, store=unit_ctx.store, redis_client=unit_ctx.redis, dispatch=unit_ctx.dispatch)
    live = client.status(job_id)["liveness"]
    assert live["relaunches"] == 1 and live["since_progress_s"] >= 0
    assert sorted(t["worker"] for t in live["tasks"]) == ["shard0@host/12", "shard1@host/14"]
    assert [e["kind"] for e in client.events(job_id) if e["kind"] in ("lease_lost", "relaunch")] == ["lease_lost",
                                                                                                     "relaunch"]


def test_a_task_that_finds_no_job_does_not_fail_the_job_the_monitor_rebuilt(unit_ctx) -> None:
    """Redis lost the job while a task ran; the monitor rebuilt it before the task's error handler ran: the
    task must not mark the rebuilt, running job failed (chaos found such a job failed at v26 by a v24 task)."""
    from types import SimpleNamespace

    from storage.jobstate import JobNotFound
    from workers import tasks

    job_id = stage(unit_ctx)
    task = SimpleNamespace(request=SimpleNamespace(id="t-lost", retries=0, hostname="w@h"))

    def lost(ctx):
        raise JobNotFound(job_id)  # read before the rebuild; the job is back by the time this is handled

    out = tasks._run_guarded(unit_ctx, task, job_id, f"aggregation of job {job_id} v0", lost, None)
    assert out == {"ignored": "job not found"}
    job = unit_ctx.jobs.get(job_id)
    assert job.status == "running" and not job.error
