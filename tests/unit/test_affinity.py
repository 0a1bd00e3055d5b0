"""Shard-to-worker affinity on fakeredis and the StubDispatcher: where a shard's next task is sent, and what the
liveness monitor makes of a task waiting in a worker's own queue."""

from __future__ import annotations

import base64
import json

from pipeline.client import Client
from storage import keys
from storage.leases import LeaseBook
from workers import affinity, app, lifecycle, liveness, shard
from workers.affinity import Holder

QA, QB = app.affinity_queue_name("a@host"), app.affinity_queue_name("b@host")
A, B = ("a@host/11", QA), ("b@host/22", QB)


def stage(unit_ctx, **spec) -> str:
    client = Client(unit_ctx.settings, store=unit_ctx.store, redis_client=unit_ctx.redis, dispatch=unit_ctx.dispatch)
    return client.stage({"shards": 2, "epochs": 1, "batch_size": 512, "codec": "topk", **spec})


def beat(unit_ctx, *workers: tuple[str, str]) -> None:
    book = LeaseBook(unit_ctx.redis, unit_ctx.settings.lease_ttl_s)
    for name, queue in workers:
        book.heartbeat(name, {"pid": 1, affinity.HEARTBEAT_QUEUE: queue})


def hold(unit_ctx, job_id: str, shard_id: int, me: tuple[str, str], step: int = 0) -> None:
    affinity.record(unit_ctx, job_id, shard_id, step, local=None, me=me)


def shard_message(queue_body: dict) -> bytes:
    body = base64.b64encode(json.dumps([[], queue_body, {}]).encode()).decode()
    return json.dumps({"body": body, "headers": {"task": "aas.train_shard", "id": "x"},
                       "properties": {"body_encoding": "base64"}}).encode()


# ---------------------------------------------------------------- the routing rule (pure)


def test_a_shard_goes_to_its_holder_while_that_process_heartbeats_else_to_the_shared_queue() -> None:
    held = {0: Holder(*A, 8), 1: Holder(*B, 8), 2: Holder("c@host/33", "shards.c@host", 8)}
    alive = {A[0]: {"shard_queue": QA}, B[0]: {"shard_queue": QB}}
    assert affinity.plan(held, alive, 3) == {0: QA, 1: QB}  # c is dead, shard 3 has no holder
    restarted = {"a@host/99": {"shard_queue": QA}, B[0]: {"shard_queue": QB}}  # same node, a new process: no state
    assert affinity.plan(held, restarted, 3) == {1: QB}
    assert affinity.plan(held, {}, 3) == {}
    odd = {0: Holder("x@host/1", "aggregate", 8)}  # a record naming another queue is never followed
    assert affinity.plan(odd, {"x@host/1": {"shard_queue": "aggregate"}}, 1) == {}


def test_a_worker_holding_every_shard_keeps_only_its_share_and_the_rest_go_to_the_shared_queue() -> None:
    held = {s: Holder(*A, 8) for s in range(4)}
    alive = {A[0]: {"shard_queue": QA}, B[0]: {"shard_queue": QB}}
    assert affinity.plan(held, alive, 4) == {0: QA, 1: QA}
    assert affinity.plan(held, {A[0]: {"shard_queue": QA}}, 4) == {s: QA for s in range(4)}  # alone: all of them


# ---------------------------------------------------------------- dispatch


def test_a_top_k_round_sends_each_shard_to_the_live_worker_holding_its_state(unit_ctx) -> None:
    job_id = stage(unit_ctx)
    hold(unit_ctx, job_id, 0, A)
    hold(unit_ctx, job_id, 1, B)
    beat(unit_ctx, A, B)
    lifecycle.advance(unit_ctx, job_id)
    [sent] = unit_ctx.dispatch.of("round")
    assert sent["queues"] == {0: QA, 1: QB}


def test_local_steps_keeping_their_inner_adamw_state_route_like_top_k_and_a_reset_does_not(unit_ctx) -> None:
    local = {"codec": "none", "local_steps": 2, "inner_optimizer": "adamw", "inner_state": "keep"}
    for spec in (local, {**local, "inner_state": "reset"}, {**local, "inner_optimizer": "sgd"}):
        job_id = stage(unit_ctx, **spec)
        hold(unit_ctx, job_id, 0, A)
        beat(unit_ctx, A)
        lifecycle.advance(unit_ctx, job_id)
    assert [m.get("queues") for m in unit_ctx.dispatch.of("round")] == [{0: QA}, None, None]


def test_a_shard_whose_holder_is_dead_or_unknown_goes_to_the_shared_queue(unit_ctx) -> None:
    job_id = stage(unit_ctx)
    hold(unit_ctx, job_id, 0, A)
    hold(unit_ctx, job_id, 1, B)
    beat(unit_ctx, B)  # a's heartbeat expired
    lifecycle.advance(unit_ctx, job_id)
    assert unit_ctx.dispatch.of("round")[0]["queues"] == {1: QB}
    other = stage(unit_ctx)  # nobody has recorded anything yet: everything shared
    lifecycle.advance(unit_ctx, other)
    assert "queues" not in unit_ctx.dispatch.of("round")[1]


def test_a_codec_without_state_and_affinity_turned_off_route_nothing(unit_ctx) -> None:
    for spec in ({"codec": "none"}, {"codec": "int8"}):
        job_id = stage(unit_ctx, **spec)
        hold(unit_ctx, job_id, 0, A)  # even a stray record changes nothing for them
        beat(unit_ctx, A)
        lifecycle.advance(unit_ctx, job_id)
    unit_ctx.settings.shard_affinity = False
    job_id = stage(unit_ctx)
    hold(unit_ctx, job_id, 0, A)
    lifecycle.advance(unit_ctx, job_id)
    assert [("queues" in m) for m in unit_ctx.dispatch.of("round")] == [False, False, False]


def test_a_relaunch_by_the_liveness_monitor_goes_to_the_shared_queue_even_with_the_holder_alive(unit_ctx) -> None:
    job_id = stage(unit_ctx)
    lifecycle.advance(unit_ctx, job_id)
    hold(unit_ctx, job_id, 0, A)
    hold(unit_ctx, job_id, 1, A)
    beat(unit_ctx, A)
    book = liveness.book_of(unit_ctx)
    book.acquire(job_id, "t0", keys.slot_shard(0, 0), A[0], "shard 0")
    unit_ctx.redis.delete(keys.lease("t0"))  # its worker stopped renewing the lease
    unit_ctx.dispatch.sent.clear()
    actions = liveness.sweep(unit_ctx, liveness.probe_for(unit_ctx), now=1000.0)
    assert [a.slot for a in actions] == ["v0:s0"]
    [sent] = unit_ctx.dispatch.of("shard")
    assert sent["attempt"] > 0 and "queue" not in sent


def test_async_steps_are_issued_to_the_holders_of_their_shards(unit_ctx) -> None:
    job_id = stage(unit_ctx, mode="async")
    hold(unit_ctx, job_id, 1, B)
    beat(unit_ctx, A, B)
    lifecycle.advance(unit_ctx, job_id)
    sent = {m["shard"]: m.get("queue") for m in unit_ctx.dispatch.of("shard")}
    assert sent == {0: None, 1: QB}


def test_a_redelivered_older_task_does_not_take_the_record_from_the_newer_one(unit_ctx) -> None:
    job_id = stage(unit_ctx)
    hold(unit_ctx, job_id, 0, B, step=16)
    hold(unit_ctx, job_id, 0, A, step=8)
    assert affinity.holders(unit_ctx, job_id) == {0: Holder(*B, 16)}
    hold(unit_ctx, job_id, 0, A, step=24)
    assert affinity.holders(unit_ctx, job_id) == {0: Holder(*A, 24)}
    unit_ctx.redis.hset(keys.job_affinity(job_id), "0", "not json")
    assert affinity.holders(unit_ctx, job_id) == {}  # skipped, and replaced by the next record
    hold(unit_ctx, job_id, 0, B, step=32)
    assert affinity.holders(unit_ctx, job_id) == {0: Holder(*B, 32)}


def test_a_top_k_shard_task_records_its_worker_and_counts_whether_it_found_its_state(unit_ctx, monkeypatch) -> None:
    monkeypatch.setitem(app._own_queue, "node", "a@host")  # this process is shard worker a (set at worker start)
    monkeypatch.setitem(app._own_queue, "queue", QA)
    job_id = stage(unit_ctx, local_steps=1)
    shard.train_shard(unit_ctx, job_id, 0, 0, 0, 0)
    [(worker_name, queue)] = [(h.worker, h.queue) for h in affinity.holders(unit_ctx, job_id).values()]
    assert worker_name.startswith("a@host/") and queue == QA
    shard.train_shard(unit_ctx, job_id, 0, 0, 1, 0)  # its previous step ran here
    unit_ctx.residuals.clear()
    shard.train_shard(unit_ctx, job_id, 0, 0, 2, 0)  # as if it had moved from another worker
    job = unit_ctx.jobs.get(job_id).to_dict()
    assert (job["state_local"], job["state_moved"]) == (1, 1)
    plain = stage(unit_ctx, codec="none")
    shard.train_shard(unit_ctx, plain, 0, 0, 0, 0)
    assert affinity.holders(unit_ctx, plain) == {} and "state_local" not in unit_ctx.jobs.get(plain).to_dict()


def test_the_affinity_record_expires_with_the_job(unit_ctx) -> None:
    from storage.retention import Retention, compact_finished_job

    job_id = stage(unit_ctx)
    hold(unit_ctx, job_id, 0, A)
    compact_finished_job(unit_ctx.redis, job_id, "succeeded", Retention(finished_ttl_s=60))
    assert 0 < unit_ctx.redis.ttl(keys.job_affinity(job_id)) <= 60


# ---------------------------------------------------------------- liveness


def test_a_task_waiting_in_a_live_workers_queue_is_queued_and_in_a_dead_ones_is_relaunched_to_the_shared_queue(
        unit_ctx) -> None:
    job_id = stage(unit_ctx)
    lifecycle.advance(unit_ctx, job_id)
    unit_ctx.dispatch.sent.clear()
    for s, q in ((0, QA), (1, QB)):
        unit_ctx.redis.lpush(q, shard_message({"job_id": job_id, "shard_id": s, "version": 0, "step": 0,
                                               "attempt": 0}))
    beat(unit_ctx, A, B)
    probe, grace = liveness.probe_for(unit_ctx), unit_ctx.settings.relaunch_grace_s
    assert probe.snapshot().slots == {(job_id, "v0:s0"), (job_id, "v0:s1")}
    for t in (1000.0, 1000.0 + 2 * grace):
        assert liveness.sweep(unit_ctx, probe, now=t) == []  # both wait behind busy workers: not lost
    unit_ctx.redis.delete(keys.worker_heartbeat(B[0]))  # b died with shard 1's task in its queue
    assert probe.snapshot().slots == {(job_id, "v0:s0")}
    assert liveness.sweep(unit_ctx, probe, now=2000.0) == []
    actions = liveness.sweep(unit_ctx, probe, now=2000.0 + grace)
    assert [a.slot for a in actions] == ["v0:s1"]
    [sent] = unit_ctx.dispatch.of("shard")
    assert sent["shard"] == 1 and "queue" not in sent


def test_on_rabbitmq_a_message_in_a_live_workers_queue_makes_the_shard_queue_busy() -> None:
    class Counted(liveness.RabbitProbe):
        def __init__(self, counts: dict[str, int], live: list[str]) -> None:
            super().__init__("amqp://unused", shard_queues=lambda: live)
            self.counts = counts

        def depths(self, queues=None):  # the broker's ready counts, without a broker
            return {q: self.counts.get(q, 0) for q in queues}

    busy = Counted({QA: 1}, [QA, QB]).snapshot()
    assert busy.holds("j", "v0:s0") and not busy.holds("j", "v0:agg") and busy.depths[QA] == 1
    assert not Counted({QA: 1}, [QB]).snapshot().holds("j", "v0:s0")  # a's queue: its worker is dead
