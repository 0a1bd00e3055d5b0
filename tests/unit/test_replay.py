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

    def __init__(self, unit_ctx: Context, parts: int = 1, **settings: object) -> None:
        def ctx(**extra: object) -> Context:
            s = Settings(redis_url="redis://fake", store_root=unit_ctx.settings.store_root, **extra)
            return Context(settings=s, redis=unit_ctx.redis, store=unit_ctx.store, jobs=JobStore(unit_ctx.redis),
                           dispatch=StubDispatcher())

        self.agg = ctx()
        self.parts = [self.agg] + [ctx() for _ in range(parts - 1)]  # with parts > 1: a process per range
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
        if len(self.parts) == 1:
            assert aggregator.aggregate_round(self.agg, job_id, version, results).committed
        else:
            done = [aggregator.aggregate_part(a, job_id, version, results, p) for p, a in enumerate(self.parts)]
            assert [d.committed for d in done] == [False] * (len(done) - 1) + [True]  # the last part commits
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


@pytest.mark.parametrize("schedule", [{}, {"lr_schedule": "cosine", "lr_warmup_versions": 2}])
def test_workers_build_each_version_from_the_blobs_bit_for_bit_and_never_read_its_checkpoint(unit_ctx, schedule
                                                                                              ) -> None:
    fleet = Fleet(unit_ctx)
    job_id = fleet.client.stage({**INT8, **schedule})  # a scheduled lr: each recipe carries its version's own
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


@pytest.mark.parametrize("check", ["xxh3_64", "crc32"])
def test_the_state_crc_sees_every_bit_name_and_shape(check: str) -> None:
    a = {"x": torch.arange(6, dtype=torch.float32), "y": torch.ones(2)}
    crc = state_crc(a, check)
    assert state_crc({k: t.clone() for k, t in a.items()}, check) == crc
    flipped = a["x"].clone()
    flipped.view(torch.int32)[3] ^= 1  # one bit of one float
    assert state_crc({**a, "x": flipped}, check) != crc
    assert state_crc({"z": a["x"], "y": a["y"]}, check) != crc
    assert state_crc({**a, "x": a["x"].reshape(2, 3)}, check) != crc
    with pytest.raises(ValueError, match="unknown state checksum 'md5'"):
        state_crc(a, "md5")


def test_a_recipe_recorded_with_crc32_before_xxh3_is_still_followed(unit_ctx) -> None:
    """Recipes stored before the checksum became xxh3-64 carry a zlib CRC-32 and no ``check``: a version stored
    that way is rebuilt, and checked, as before."""
    from pipeline.recipe import encode_recipe, parse

    _, _, job_id, whole = paired_jobs(unit_ctx, every=4, rounds=2, parts=1)
    r = json.loads(unit_ctx.jobs.get(job_id).fields["recipe"])
    assert r["check"] == "xxh3_64"
    weights, momentum = stored_version(unit_ctx, job_id, 2)
    old = {k: v for k, v in r.items() if k != "check"} | {"crc": state_crc({**weights, **momentum_entries(momentum)},
                                                                            "crc32")}
    assert parse(old)["check"] == "crc32"
    unit_ctx.store.put(keys.version_recipe(job_id, 2), encode_recipe(old))
    assert_same_versions(unit_ctx, job_id, whole, range(3))
    with pytest.raises(ValueError, match="unknown state checksum"):
        parse({**r, "check": "md5"})


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


# ---------------------------------------------------------------- full checkpoints every K versions, recipes between


def stored_version(ctx: Context, job_id: str, version: int) -> tuple[dict, dict]:
    """Version `version` as a process holding nothing reads it (a fresh Context): weights and momentum buffers."""
    fresh = Fleet(ctx).agg
    ckpt = fresh.checkpoint(keys.checkpoint(job_id, version), job_id, with_opt=True)
    return ckpt.state, ckpt.opt.get("momentum", {})


def assert_same_versions(ctx: Context, a: str, b: str, versions: range) -> None:
    for v in versions:
        (wa, ma), (wb, mb) = stored_version(ctx, a, v), stored_version(ctx, b, v)
        assert_bitwise_equal(wa, wb)
        assert_bitwise_equal(ma, mb)


FP32_MOMENTUM = {**INT8, "codec": "none", "momentum": 0.9, "nesterov": True}  # no byte saving: replayed anyway


@pytest.mark.parametrize("spec", [FP32_MOMENTUM, {**INT8, "local_steps": 2}], ids=["fp32-nesterov", "diloco-int8"])
def test_versions_between_full_checkpoints_are_stored_as_recipes_and_rebuilt_bit_for_bit(unit_ctx, spec) -> None:
    h = spec.get("local_steps", 1)
    ref, fleet = Fleet(unit_ctx), Fleet(unit_ctx)
    every = fleet.client.stage({**spec, "checkpoint_every_versions": 3})
    whole = ref.client.stage(spec)
    for v in range(5):
        ref.round(whole, v, step=h * v)
        results = fleet.round(every, v, step=h * v)
        assert [r["replayed"] for r in results] == [v > 0] * 2  # fp32 too: a version without a checkpoint
    listed = list(unit_ctx.store.list(keys.checkpoint_prefix(every)))
    assert keys.checkpoint_versions(listed) == [0, 3]
    assert keys.recipe_versions(listed) == [1, 2, 4, 5]
    assert fleet.reads == [keys.checkpoint(every, 0)] * 2  # the workers never read a version whole
    assert unit_ctx.jobs.get(every).version == 5
    # Every version, read by a process that holds nothing, equals the job that checkpoints every version.
    assert_same_versions(unit_ctx, every, whole, range(6))
    for i in range(2):
        assert_bitwise_equal(fleet.held(i, every, 4), ref.held(i, whole, 4))  # what each trained on last


def test_the_last_version_is_always_a_full_checkpoint(unit_ctx) -> None:
    fleet = Fleet(unit_ctx)
    job_id = fleet.client.stage({**INT8, "epochs": 1, "checkpoint_every_versions": 100})
    total = unit_ctx.jobs.get(job_id).total_rounds
    for v in range(total):
        fleet.round(job_id, v)
    listed = list(unit_ctx.store.list(keys.checkpoint_prefix(job_id)))
    assert keys.checkpoint_versions(listed) == [0, total]
    assert keys.recipe_versions(listed) == list(range(1, total))


def test_an_aggregator_restarted_between_full_checkpoints_rebuilds_its_version_and_continues_exactly(unit_ctx) -> None:
    ref, fleet = Fleet(unit_ctx), Fleet(unit_ctx)
    every = fleet.client.stage({**FP32_MOMENTUM, "checkpoint_every_versions": 4})
    whole = ref.client.stage(FP32_MOMENTUM)
    for v in range(2):
        ref.round(whole, v)
        fleet.round(every, v)
    fleet.agg = Fleet(unit_ctx).agg  # a new aggregator process: version 2 exists only as its recipe
    for v in range(2, 6):
        ref.round(whole, v)
        fleet.round(every, v)
    assert_same_versions(unit_ctx, every, whole, range(6))


def test_a_worker_that_holds_nothing_rebuilds_the_version_then_replays_with_its_momentum(unit_ctx) -> None:
    from storage.datastore import read_split

    fleet = Fleet(unit_ctx)
    job_id = fleet.client.stage({**FP32_MOMENTUM, "checkpoint_every_versions": 8})
    for v in range(3):
        fleet.round(job_id, v)
    late = Fleet(unit_ctx).workers[0]  # joins at version 3: rebuilt from v0's checkpoint and three recipes
    fleet.workers[0] = late
    down = unit_ctx.jobs.get(job_id).num("bytes_down")
    results = fleet.round(job_id, 3)
    assert results[0]["replayed"] is False
    ckpt0 = len(unit_ctx.store.get(keys.checkpoint(job_id, 0)))  # v0 has no optimizer state
    blobs_v0_v2 = sum(len(unit_ctx.store.get(k)) for k in unit_ctx.store.list(keys.gradients_prefix(job_id))
                      if (g := keys.parse_gradient(k)) is not None and g.version < 3)
    shard0_v2 = len(unit_ctx.store.get(keys.gradient(job_id, 2, 0, 0)))
    aggregator_v3 = sum(r["bytes"] for r in results)
    manifest = late.manifest(unit_ctx.jobs.get(job_id).fields["manifest"])
    data = read_split(unit_ctx.store, manifest.shards[0])[2]
    # The late worker read its shard's data, v0 and every blob of rounds 0-2 (no checkpoint of v3: there is
    # none); the other replayed, reading round 2's other blob (its own, fp32, is held in memory in such a job);
    # the aggregator read round 3's blobs.
    assert unit_ctx.jobs.get(job_id).num("bytes_down") - down == (
        data + ckpt0 + blobs_v0_v2 + shard0_v2 + aggregator_v3)
    assert late.held_momentum(keys.checkpoint(job_id, 3)) is not None
    assert [r["replayed"] for r in fleet.round(job_id, 4)] == [True, True]
    ref = Fleet(unit_ctx)
    whole = ref.client.stage(FP32_MOMENTUM)
    for v in range(5):
        ref.round(whole, v)
    assert_bitwise_equal(fleet.held(0, job_id, 4), ref.checkpoint(whole, 4))


def test_a_recipe_that_does_not_rebuild_its_version_is_refused_by_name(unit_ctx) -> None:
    from pipeline.blobs import BlobError
    from pipeline.recipe import encode_recipe

    fleet = Fleet(unit_ctx)
    job_id = fleet.client.stage({**INT8, "checkpoint_every_versions": 4})
    results = [fleet.round(job_id, v) for v in range(2)]  # v2 the newest: the job field holds its recipe
    rkey = keys.version_recipe(job_id, 2)
    good = unit_ctx.store.get(rkey)
    r = json.loads(unit_ctx.jobs.get(job_id).fields["recipe"])
    unit_ctx.store.put(rkey, encode_recipe({**r, "hparams": {**r["hparams"], "lr": r["hparams"]["lr"] * 2}}))
    with pytest.raises(BlobError, match=r"version 2 rebuilt from full checkpoint v0 differs .*checksum"):
        stored_version(unit_ctx, job_id, 2)
    unit_ctx.store.put(rkey, bytes(good[:-1]) + bytes([good[-1] ^ 1]))  # torn: fails its digest
    with pytest.raises(BlobError, match=rkey):
        stored_version(unit_ctx, job_id, 2)
    unit_ctx.store.put(rkey, good)
    unit_ctx.store.delete(results[1][0]["key"])  # a blob round 1 folded
    with pytest.raises(Exception, match=results[1][0]["key"]):
        stored_version(unit_ctx, job_id, 2)
    with pytest.raises(Exception, match=keys.checkpoint(job_id, 7)):
        stored_version(unit_ctx, job_id, 7)  # neither a checkpoint nor a recipe: the checkpoint's key is named


def test_resume_from_the_store_finds_the_newest_version_stored_as_a_recipe(unit_ctx) -> None:
    from storage.retention import forget_job
    from workers.staging import rebuild_job

    fleet = Fleet(unit_ctx)
    job_id = fleet.client.stage({**INT8, "checkpoint_every_versions": 4})
    for v in range(6):
        fleet.round(job_id, v)
    forget_job(unit_ctx.redis, job_id)  # Redis lost the job
    assert rebuild_job(fleet.client.services, job_id).version == 6  # v6: a recipe (v4 is the newest checkpoint)


def test_checkpoint_every_versions_is_refused_where_versions_cannot_be_rebuilt() -> None:
    from pipeline.spec import SpecError, parse_spec

    with pytest.raises(SpecError, match="checkpoint_every_versions: versions between full checkpoints"):
        parse_spec({"checkpoint_every_versions": 4, "mode": "async"})
    assert parse_spec({"checkpoint_every_versions": 4}).checkpoint_every_versions == 4
    assert parse_spec({"checkpoint_every_versions": 4, "aggregation_parts": 2}).aggregation_parts == 2


@pytest.mark.parametrize("parts", [1, 2])
def test_the_publisher_evaluates_and_registers_a_version_stored_as_its_recipe(unit_ctx, parts: int) -> None:
    from pipeline.artifacts import dequantized_state
    from workers.publish import evaluate_and_publish

    ref, _, every, whole = paired_jobs(unit_ctx, every=4, rounds=3, parts=parts, publish_every_versions=2)
    stored = keys.checkpoint(every, 2) if parts == 1 else keys.checkpoint_part(every, 2, 0)
    assert not unit_ctx.store.exists(stored)  # v2: its recipe only (one per range)
    publisher = Fleet(unit_ctx).agg  # a process of its own (the publish queue's): it holds no version
    out = evaluate_and_publish(publisher, every, 2)
    assert out["registered"] is not None and out["registered"]["lineage"]["round"] == 2
    reg = publisher.registry()
    rec = reg.get(out["registered"]["model"], out["registered"]["version"])
    served = dequantized_state(reg.fetch_artifact(rec.model, rec.version), rec.artifact_key)
    assert_bitwise_equal(served, ref.checkpoint(whole, 2))  # the default chain (zstd) is lossless


# ---------------------------------------------------------------- in parameter ranges, recipes between full checkpoints


def paired_jobs(ctx: Context, every: int, rounds: int, parts: int = 2, **spec: object
                ) -> tuple[Fleet, Fleet, str, str]:
    """A job with a full checkpoint every `every` versions, in `parts` parts (a process per part), and the same spec
    in one part, every version whole, each run `rounds` rounds: (reference fleet, fleet, job, reference job).
    `spec`: fields both jobs add to FP32_MOMENTUM."""
    ref, fleet = Fleet(ctx), Fleet(ctx, parts=parts)
    job_id = fleet.client.stage({**FP32_MOMENTUM, **spec, "checkpoint_every_versions": every,
                                 **({"aggregation_parts": parts} if parts > 1 else {})})
    whole = ref.client.stage({**FP32_MOMENTUM, **spec})
    for v in range(rounds):
        ref.round(whole, v)
        fleet.round(job_id, v)
    return ref, fleet, job_id, whole


def part_objects(ctx: Context, job_id: str) -> tuple[list[int], list[int]]:
    """(versions whose every range is stored whole, versions whose every range is stored as its recipe)."""
    listed = set(ctx.store.list(keys.checkpoint_prefix(job_id)))
    versions = keys.checkpoint_versions(listed)
    whole = [v for v in versions if all(keys.checkpoint_part(job_id, v, p) in listed for p in range(2))]
    recipes = [v for v in versions if all(keys.version_recipe(job_id, v, p) in listed for p in range(2))]
    return whole, recipes


@pytest.mark.parametrize("spec", [FP32_MOMENTUM, {**INT8, "local_steps": 2}], ids=["fp32-nesterov", "diloco-int8"])
def test_versions_aggregated_in_parts_are_stored_as_a_recipe_per_range_and_rebuilt_bit_for_bit(unit_ctx, spec
                                                                                               ) -> None:
    """Two aggregation parts in processes of their own, a full checkpoint every 3 versions: each part writes its
    range whole at v3 and as its recipe at v1, v2, v4, v5; the shard workers replay every version from the parts'
    recipes; every version, read by a process holding nothing, equals the job aggregated in one part that
    checkpoints every version (weights and momentum buffers)."""
    h = spec.get("local_steps", 1)
    ref, fleet = Fleet(unit_ctx), Fleet(unit_ctx, parts=2)
    every = fleet.client.stage({**spec, "checkpoint_every_versions": 3, "aggregation_parts": 2})
    whole = ref.client.stage(spec)
    for v in range(5):
        ref.round(whole, v, step=h * v)
        results = fleet.round(every, v, step=h * v)
        assert all(len(r["parts"]) == 2 for r in results)
        assert [r["replayed"] for r in results] == [v > 0] * 2
    assert part_objects(unit_ctx, every) == ([3], [1, 2, 4, 5])  # (v0 is one checkpoint, never in parts)
    assert fleet.reads == [keys.checkpoint(every, 0)] * 2  # the workers never read a version whole
    recipe = json.loads(unit_ctx.jobs.get(every).fields["recipe"])
    assert recipe["version"] == 5 and [r["part"] for r in recipe["parts"]] == [0, 1]
    assert_same_versions(unit_ctx, every, whole, range(6))
    for i in range(2):
        assert_bitwise_equal(fleet.held(i, every, 4), ref.held(i, whole, 4))


def test_a_part_process_restarted_between_full_checkpoints_rebuilds_its_range_and_continues_exactly(unit_ctx
                                                                                                      ) -> None:
    ref, fleet = Fleet(unit_ctx), Fleet(unit_ctx, parts=2)
    every = fleet.client.stage({**FP32_MOMENTUM, "checkpoint_every_versions": 4, "aggregation_parts": 2})
    whole = ref.client.stage(FP32_MOMENTUM)
    for v in range(6):
        if v == 2:
            fleet.parts[1] = Fleet(unit_ctx).agg  # a new process for range 1: its v2 exists only as its recipe
        ref.round(whole, v)
        fleet.round(every, v)
    assert part_objects(unit_ctx, every) == ([4], [1, 2, 3, 5, 6])
    assert_same_versions(unit_ctx, every, whole, range(7))


def test_a_worker_joining_a_job_in_parts_rebuilds_or_reads_the_version_then_replays_with_its_momentum(unit_ctx
                                                                                                       ) -> None:
    """Joining at v2 (stored as recipes): rebuilt from v0 and the blobs, momentum buffers with it. Joining at v3
    (a full checkpoint of each range): the ranges read whole, then each range's buffers once. Either way it
    replays the next versions, bit for bit."""
    ref, fleet = Fleet(unit_ctx), Fleet(unit_ctx, parts=2)
    job_id = fleet.client.stage({**FP32_MOMENTUM, "checkpoint_every_versions": 3, "aggregation_parts": 2})
    whole = ref.client.stage(FP32_MOMENTUM)
    for v in range(6):
        if v in (2, 3):
            fleet.workers[v - 2] = Fleet(unit_ctx).workers[0]  # holds nothing
        ref.round(whole, v)
        replayed = [r["replayed"] for r in fleet.round(job_id, v)]
        assert replayed == {0: [False] * 2, 2: [False, True], 3: [True, False]}.get(v, [True, True])
        for i in range(2):
            assert_bitwise_equal(fleet.held(i, job_id, v), ref.held(i, whole, v))
    for w in fleet.workers:
        held = w.held_momentum(keys.checkpoint(job_id, 5))
        assert held is not None
        assert_bitwise_equal(held, stored_version(unit_ctx, whole, 5)[1])


def test_a_range_recipe_that_does_not_rebuild_its_range_is_refused_by_name(unit_ctx) -> None:
    from pipeline.blobs import BlobError
    from pipeline.recipe import encode_recipe

    _, _, job_id, _ = paired_jobs(unit_ctx, every=4, rounds=2)
    rkey = keys.version_recipe(job_id, 2, 1)
    r = json.loads(unit_ctx.jobs.get(job_id).fields["recipe"])["parts"][1]
    unit_ctx.store.put(rkey, encode_recipe({**r, "crc": r["crc"] ^ 1}))
    with pytest.raises(BlobError, match=rf"{rkey}.*version 2 rebuilt from full checkpoint v0 differs"):
        stored_version(unit_ctx, job_id, 2)
    unit_ctx.store.put(rkey, encode_recipe({**r, "part": 0}))  # range 0's recipe where range 1's belongs
    with pytest.raises(BlobError, match=rf"{rkey}.*not the recipe of version 2 part 1"):
        stored_version(unit_ctx, job_id, 2)


def test_a_part_task_takes_the_range_its_process_holds_whichever_range_it_was_sent_for(unit_ctx) -> None:
    """The K part tasks are not routed: a task that lands on the process holding another range than the one it was
    sent for aggregates the range its process holds. Sent crosswise every round, neither process reads or rebuilds
    a range after round 0, and every version is the one-part job's."""
    ref, fleet = Fleet(unit_ctx), Fleet(unit_ctx, parts=2)
    job_id = fleet.client.stage({**FP32_MOMENTUM, "checkpoint_every_versions": 4, "aggregation_parts": 2})
    whole = ref.client.stage(FP32_MOMENTUM)
    reads: list[str] = []
    for a in fleet.parts:
        a._read_checkpoint = (lambda key, *x, _r=a._read_checkpoint, **k: (reads.append(key), _r(key, *x, **k))[1])
    for v in range(6):
        ref.round(whole, v)
        results = [shard.train_shard(w, job_id, s, v, v, 0) for s, w in enumerate(fleet.workers)]
        sent = [v % 2, 1 - v % 2]  # slot 0 and slot 1 swap processes every round
        done = [aggregator.aggregate_part(a, job_id, v, results, p) for a, p in zip(fleet.parts, sent, strict=True)]
        assert [d.committed for d in done] == [False, True]
        taken = [d.metrics.get("part") for d in done[:1]]
        assert taken == [0]  # process 0 took range 0 every round (range 0 was its first, sent at v0)
        assert unit_ctx.jobs.metrics_at(job_id, v + 1)["parts_read"] == (2 if v == 0 else 0)
    assert reads == [keys.checkpoint(job_id, 0)] * 2  # version 0, once per process; nothing after
    assert_same_versions(unit_ctx, job_id, whole, range(7))


def test_a_range_claimed_by_a_process_that_died_is_taken_by_the_task_sent_again(unit_ctx) -> None:
    ref, fleet, job_id, whole = paired_jobs(unit_ctx, every=4, rounds=2)
    ref.round(whole, 2)
    results = [shard.train_shard(w, job_id, s, 2, 2, 0) for s, w in enumerate(fleet.workers)]
    assert aggregator.claim_range(fleet.parts[0], job_id, 2, 0, 2) == 0  # ... and its process dies here
    assert not aggregator.aggregate_part(fleet.parts[1], job_id, 2, results, 1).committed
    survivor = fleet.parts[1]  # the dead process's task, delivered again to the process still running
    assert aggregator.claim_range(survivor, job_id, 2, 0, 2) == 0  # claimed by the dead process, not written
    assert aggregator.aggregate_part(survivor, job_id, 2, results, 0).committed
    assert aggregator.claim_range(survivor, job_id, 2, 0, 2) is None  # every range written
    assert_same_versions(unit_ctx, job_id, whole, range(4))


def test_resume_from_the_store_finds_and_rebuilds_a_version_stored_as_range_recipes(unit_ctx) -> None:
    from storage.retention import forget_job
    from workers.staging import rebuild_job

    _, fleet, job_id, whole = paired_jobs(unit_ctx, every=4, rounds=6)
    forget_job(unit_ctx.redis, job_id)  # Redis lost the job, its parts' records and claims with it
    assert not list(unit_ctx.redis.scan_iter(match=keys.job_parts_pattern(job_id)))
    assert rebuild_job(fleet.client.services, job_id).version == 6  # v6: each range a recipe (v4 the full one)
    assert_same_versions(unit_ctx, job_id, whole, range(7))
