"""A shard worker holding version N builds N+1 from the round's update blobs (workers/replay.py).

Each shard worker here has its own Context (its own caches, as separate processes have), on one Redis and one
store; the aggregator has a third. The replayed weights must equal the checkpoint's bit for bit; where the
replay cannot be exact or would not save bytes, the worker reads the checkpoint as before.
"""

from __future__ import annotations

import json

import pytest
import torch

from pipeline.checkpoint import decode_checkpoint
from pipeline.client import Client
from pipeline.recipe import momentum_entries, recipe, state_crc
from pipeline.settings import Settings
from storage import keys
from storage.jobstate import JobStore
from workers import aggregator, replay, shard
from workers.context import Context
from workers.dispatch import StubDispatcher
from workers.metrics import SHARD_REGISTRY

CPU = torch.device("cpu")
INT8 = {"codec": "int8", "momentum": 0.0, "lr": 0.1, "batch_size": 16, "shards": 2}


class Fleet:
    """An aggregator and two shard workers, each with its own Context; counts each worker's checkpoint reads."""

    def __init__(self, unit_ctx: Context, **settings: object) -> None:
        def ctx(**extra: object) -> Context:
            s = Settings(redis_url="redis://fake", store_root=unit_ctx.settings.store_root, **extra)
            return Context(settings=s, redis=unit_ctx.redis, store=unit_ctx.store, jobs=JobStore(unit_ctx.redis),
                           dispatch=StubDispatcher())

        self.agg = ctx()
        self.workers = [ctx(**settings), ctx(**settings)]
        self.reads: list[str] = []
        for w in self.workers:
            read = w._read_checkpoint

            def counted(key: str, *a: object, _read=read, **k: object):
                self.reads.append(key)
                return _read(key, *a, **k)

            w._read_checkpoint = counted  # type: ignore[method-assign]
        self.client = Client(self.agg.settings, store=unit_ctx.store, redis_client=unit_ctx.redis,
                             dispatch=self.agg.dispatch)

    def round(self, job_id: str, version: int, step: int | None = None) -> list[dict]:
        step = version if step is None else step
        results = [shard.train_shard(w, job_id, s, version, step, 0) for s, w in enumerate(self.workers)]
        assert aggregator.aggregate_round(self.agg, job_id, version, results).committed
        return results

    def checkpoint(self, job_id: str, version: int) -> dict[str, torch.Tensor]:
        return decode_checkpoint(self.agg.store.get(keys.checkpoint(job_id, version)), "test").state

    def held(self, i: int, job_id: str, version: int) -> dict[str, torch.Tensor]:
        module = self.workers[i].cached_model(keys.checkpoint(job_id, version), CPU)
        assert module is not None
        return module.state_dict()


def replays(outcome: str) -> float:
    return SHARD_REGISTRY.get_sample_value("aas_shard_versions_replayed_total", {"outcome": outcome}) or 0.0


def assert_bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_workers_build_each_version_from_the_blobs_bit_for_bit_and_never_read_its_checkpoint(unit_ctx) -> None:
    fleet = Fleet(unit_ctx)
    job_id = fleet.client.stage(INT8)
    first = fleet.round(job_id, 0)
    assert [r["replayed"] for r in first] == [False, False]
    assert fleet.reads == [keys.checkpoint(job_id, 0)] * 2  # version 0: nothing to replay from
    prev = first
    for v in range(1, 4):
        down = unit_ctx.jobs.get(job_id).num("bytes_down")
        results = fleet.round(job_id, v)
        assert [r["replayed"] for r in results] == [True, True]
        for i in range(2):
            assert_bitwise_equal(fleet.held(i, job_id, v), fleet.checkpoint(job_id, v))
        # Each worker read the other's blob of the round before (its own is in memory), not the checkpoint; the
        # aggregator read this round's blobs (it holds version v from its own write).
        assert unit_ctx.jobs.get(job_id).num("bytes_down") - down == (
            sum(r["bytes"] for r in prev) + sum(r["bytes"] for r in results))
        prev = results
    assert fleet.reads == [keys.checkpoint(job_id, 0)] * 2


def test_replay_reads_only_the_blobs_the_worker_does_not_hold(unit_ctx) -> None:
    fleet = Fleet(unit_ctx)
    job_id = fleet.client.stage(INT8)
    results = fleet.round(job_id, 0)
    w = fleet.workers[0]
    before = w.take_unsent_down(job_id)
    assert before == 0
    raw = unit_ctx.jobs.get(job_id).fields["recipe"]
    assert replay.advance(w, job_id, 1, raw, CPU)
    assert w.take_unsent_down(job_id) == results[1]["bytes"]  # shard 1's blob; its own came from memory
    assert_bitwise_equal(fleet.held(0, job_id, 1), fleet.checkpoint(job_id, 1))


def test_local_steps_with_plain_averaging_replay_too(unit_ctx) -> None:
    fleet = Fleet(unit_ctx)
    job_id = fleet.client.stage({**INT8, "local_steps": 3, "outer_lr": 1.0, "outer_momentum": 0.0})
    for v in range(3):
        results = fleet.round(job_id, v, step=3 * v)
        assert [r["replayed"] for r in results] == [v > 0] * 2
    assert_bitwise_equal(fleet.held(1, job_id, 2), fleet.checkpoint(job_id, 2))
    assert fleet.reads == [keys.checkpoint(job_id, 0)] * 2


@pytest.mark.parametrize("spec", [
    {"momentum": 0.9},
    {"momentum": 0.9, "nesterov": True, "weight_decay": 1e-3},
    {"local_steps": 2},  # DiLoCo's defaults: Nesterov outer momentum 0.9
], ids=["sgd-momentum", "nesterov-wd", "diloco-defaults"])
def test_with_momentum_the_workers_hold_the_buffers_and_replay_bit_for_bit(unit_ctx, spec) -> None:
    fleet = Fleet(unit_ctx)
    job_id = fleet.client.stage({**INT8, **spec})
    h = spec.get("local_steps", 1)
    for v in range(4):
        assert [r["replayed"] for r in fleet.round(job_id, v, step=h * v)] == [v > 0] * 2
    assert fleet.reads == [keys.checkpoint(job_id, 0)] * 2
    ckey = keys.checkpoint(job_id, 3)
    opt = unit_ctx.store.get(keys.optimizer_state(ckey))
    stored = decode_checkpoint(unit_ctx.store.get(ckey), "test", opt_data=opt)
    for i, w in enumerate(fleet.workers):
        assert_bitwise_equal(fleet.held(i, job_id, 3), stored.state)
        held = w.held_momentum(ckey)
        assert held is not None
        assert_bitwise_equal(held, stored.opt["momentum"])


def test_a_worker_that_read_a_checkpoint_reads_its_momentum_once_and_replays_the_next_versions(unit_ctx) -> None:
    fleet = Fleet(unit_ctx)
    job_id = fleet.client.stage({**INT8, "momentum": 0.9})
    fleet.round(job_id, 0)
    late = Fleet(unit_ctx).workers[0]  # joins at version 1: holds nothing
    late_reads: list[str] = []
    read = late.store.get
    late.store.get = lambda key: (late_reads.append(key), read(key))[1]  # type: ignore[method-assign]
    fleet.workers[0] = late
    fleet.round(job_id, 1)
    v1 = keys.checkpoint(job_id, 1)
    assert v1 in late_reads and keys.optimizer_state(v1) in late_reads  # the weights, then the buffers once
    late_reads.clear()
    for v in (2, 3):
        assert [r["replayed"] for r in fleet.round(job_id, v)] == [True, True]
    assert not [k for k in late_reads if k.startswith(keys.checkpoint_prefix(job_id))], late_reads
    assert_bitwise_equal(fleet.held(0, job_id, 3), fleet.checkpoint(job_id, 3))


def test_no_recipe_where_the_replay_would_not_save_bytes(unit_ctx) -> None:
    fleet = Fleet(unit_ctx)
    job_id = fleet.client.stage({**INT8, "codec": "none"})  # two fp32 updates: the other's is as big as the weights
    for v in range(3):
        assert [r["replayed"] for r in fleet.round(job_id, v)] == [False, False]
        assert unit_ctx.jobs.get(job_id).fields["recipe"] == ""
    assert fleet.reads == [keys.checkpoint(job_id, v) for v in range(3) for _ in range(2)]


def test_weights_that_differ_from_the_aggregators_are_dropped_and_the_checkpoint_read(unit_ctx) -> None:
    fleet = Fleet(unit_ctx)
    job_id = fleet.client.stage(INT8)
    fleet.round(job_id, 0)
    module = fleet.workers[0].cached_model(keys.checkpoint(job_id, 0), CPU)
    assert module is not None
    with torch.no_grad():  # as another CPU's rounding, or a task that left the weights changed, would
        next(module.parameters()).view(-1)[0] += 1e-6
    mismatched, replayed = replays("mismatch"), replays("replayed")
    results = [shard.train_shard(w, job_id, s, 1, 1, 0) for s, w in enumerate(fleet.workers)]
    assert [r["replayed"] for r in results] == [False, True]
    assert (replays("mismatch"), replays("replayed")) == (mismatched + 1, replayed + 1)
    assert fleet.reads[-1] == keys.checkpoint(job_id, 1)
    assert_bitwise_equal(fleet.held(0, job_id, 1), fleet.checkpoint(job_id, 1))


def test_a_missing_or_corrupt_blob_leaves_the_module_untouched_and_the_checkpoint_is_read(unit_ctx) -> None:
    fleet = Fleet(unit_ctx)
    job_id = fleet.client.stage(INT8)
    results = fleet.round(job_id, 0)
    raw = unit_ctx.jobs.get(job_id).fields["recipe"]
    w = fleet.workers[0]
    v0 = fleet.held(0, job_id, 0)
    v0 = {k: t.clone() for k, t in v0.items()}
    data = bytearray(unit_ctx.store.get(results[1]["key"]))
    data[-1] ^= 0xFF
    unit_ctx.store.put(results[1]["key"], bytes(data))
    unreadable = replays("unreadable")
    assert not replay.advance(w, job_id, 1, raw, CPU)  # fails its digest: never folded into weights
    assert replays("unreadable") == unreadable + 1
    assert_bitwise_equal(fleet.held(0, job_id, 0), v0)
    unit_ctx.store.delete(results[1]["key"])
    assert not replay.advance(w, job_id, 1, raw, CPU)
    assert_bitwise_equal(fleet.held(0, job_id, 0), v0)
    out = shard.train_shard(w, job_id, 0, 1, 1, 0)
    assert not out["replayed"] and fleet.reads[-1] == keys.checkpoint(job_id, 1)


def test_a_recipe_for_another_version_a_cuda_device_or_replay_off_is_not_followed(unit_ctx) -> None:
    fleet = Fleet(unit_ctx, replay_versions=False)
    job_id = fleet.client.stage(INT8)
    fleet.round(job_id, 0)
    raw = unit_ctx.jobs.get(job_id).fields["recipe"]
    assert json.loads(raw)["version"] == 1
    assert not replay.advance(fleet.workers[0], job_id, 1, raw, CPU)  # replay_versions off
    on = Fleet(unit_ctx)
    job_id = on.client.stage(INT8)
    on.round(job_id, 0)
    raw = unit_ctx.jobs.get(job_id).fields["recipe"]
    assert not replay.advance(on.workers[0], job_id, 2, raw, CPU)  # the recipe is version 1's
    assert not replay.advance(on.workers[0], job_id, 1, raw, torch.device("cuda"))
    assert not replay.advance(on.workers[0], job_id, 1, "{not json", CPU)
    assert replay.advance(on.workers[0], job_id, 1, raw, CPU)


def test_the_recipe_is_written_only_where_it_saves_bytes_and_checks_the_momentum_too() -> None:
    state = {"w": torch.zeros(1000)}  # 4,000 bytes of weights
    small = [("k0", "d0", 1000, 0), ("k1", "d1", 1000, 1)]
    big = [("k0", "d0", 4100, 0), ("k1", "d1", 4100, 1)]
    sgd = {"lr": 0.1, "momentum": 0.0, "nesterov": False, "weight_decay": 0.0}
    r = recipe(3, small, state, sgd, {}, base_had_momentum=False)
    assert r["version"] == 3 and r["updates"] == [list(s) for s in small] and r["crc"] == state_crc(state)
    assert recipe(3, big, state, sgd, {}, base_had_momentum=False) == {}
    assert recipe(3, [], state, sgd, {}, base_had_momentum=False) == {}
    buf = {"w": torch.ones(1000)}
    m = recipe(3, small, state, {**sgd, "momentum": 0.9}, buf, base_had_momentum=True)
    assert m["base_momentum"] and m["hparams"]["momentum"] == 0.9
    assert m["crc"] == state_crc({**state, **momentum_entries(buf)}) != r["crc"]


def test_the_state_crc_sees_every_bit_name_and_shape() -> None:
    a = {"x": torch.arange(6, dtype=torch.float32), "y": torch.ones(2)}
    crc = state_crc(a)
    assert state_crc({k: t.clone() for k, t in a.items()}) == crc
    flipped = a["x"].clone()
    flipped.view(torch.int32)[3] ^= 1  # one bit of one float
    assert state_crc({**a, "x": flipped}) != crc
    assert state_crc({"z": a["x"], "y": a["y"]}) != crc
    assert state_crc({**a, "x": a["x"].reshape(2, 3)}) != crc


def test_a_worker_holds_its_blobs_of_one_round_only(unit_ctx) -> None:
    fleet = Fleet(unit_ctx)
    job_id = fleet.client.stage({**INT8, "shards": 4})
    w = fleet.workers[0]
    first = [shard.train_shard(w, job_id, s, 0, 0, 0)["key"] for s in range(4)]
    assert sorted(w.held_blobs.keys()) == sorted(first)  # several shards of one round
    results = [shard.train_shard(w, job_id, s, 0, 0, 0) for s in range(4)]
    assert aggregator.aggregate_round(fleet.agg, job_id, 0, results).committed
    second = shard.train_shard(w, job_id, 0, 1, 1, 0)
    assert second["replayed"]  # from its own four blobs: nothing read
    assert w.held_blobs.keys() == [second["key"]]
