"""A sync round through the real shard and aggregator code equals a single-process computation."""

from __future__ import annotations

import pytest
import torch

from pipeline import blobs
from pipeline.checkpoint import decode_checkpoint
from pipeline.client import Client
from pipeline.data import batch_rows, batches_per_epoch, load_digits
from pipeline.spec import JobSpec
from pipeline.training import loss_fn
from storage import keys
from storage.datastore import Manifest, read_split
from workers import aggregator, shard


def stage(unit_ctx, **spec) -> str:
    client = Client(unit_ctx.settings, store=unit_ctx.store, redis_client=unit_ctx.redis,
                    dispatch=unit_ctx.dispatch)
    return client.stage({"momentum": 0.0, "lr": 0.1, "batch_size": 16, **spec})


def reference_step(unit_ctx, job_id: str, shards: int, lr: float) -> dict[str, torch.Tensor]:
    """One SGD step on the mean loss over the union of the round's mini-batches, in one process."""
    job = unit_ctx.jobs.get(job_id)
    manifest = Manifest.from_json(unit_ctx.store.get(job.fields["manifest"]))
    ckpt = decode_checkpoint(unit_ctx.store.get(keys.checkpoint(job_id, 0)), "v0")
    model = ckpt.build()
    bpe = batches_per_epoch(manifest.shard_sizes, 16)
    xs, ys = [], []
    for s in range(shards):
        x, y, _ = read_split(unit_ctx.store, manifest.shards[s])
        rows = batch_rows(manifest.shard_sizes[s], 16, 0, bpe, 0, s)
        xs.append(x[rows])
        ys.append(y[rows])
    loss = loss_fn(model(torch.cat(xs)), torch.cat(ys))
    loss.backward()
    return {n: (p - lr * p.grad).detach() for n, p in model.named_parameters()}


@pytest.mark.parametrize("shards", [1, 2, 3])
def test_sync_round_with_plain_sgd_equals_single_process_weighted_mean_gradient(unit_ctx, shards: int) -> None:
    job_id = stage(unit_ctx, shards=shards)
    results = [shard.train_shard(unit_ctx, job_id, s, 0, 0, 0) for s in range(shards)]
    outcome = aggregator.aggregate_round(unit_ctx, job_id, 0, results)
    assert outcome.committed and outcome.version == 1
    got = decode_checkpoint(unit_ctx.store.get(keys.checkpoint(job_id, 1)), "v1").state
    want = reference_step(unit_ctx, job_id, shards, 0.1)
    for name, w in want.items():
        assert (got[name] - w).abs().max().item() <= 1e-6, name


def test_aggregator_checks_shard_identities_not_the_count_of_results(unit_ctx) -> None:
    job_id = stage(unit_ctx, shards=3)
    r0 = shard.train_shard(unit_ctx, job_id, 0, 0, 0, 0)
    r1 = shard.train_shard(unit_ctx, job_id, 1, 0, 0, 0)
    # The chord fired early: three results, but shard 1 twice and shard 2 never computed.
    with pytest.raises(aggregator.RoundIncomplete, match="shard 2"):
        aggregator.aggregate_round(unit_ctx, job_id, 0, [r0, r1, r1])
    assert unit_ctx.jobs.get(job_id).version == 0
    # Once shard 2's blob exists, the same (defective) result list commits with all three shards.
    shard.train_shard(unit_ctx, job_id, 2, 0, 0, 0)
    outcome = aggregator.aggregate_round(unit_ctx, job_id, 0, [r0, r1, r1])
    assert outcome.committed
    assert unit_ctx.jobs.consumed(job_id, 1) == {keys.gradient_identity(job_id, s, 0, 0) for s in range(3)}


def test_duplicate_aggregation_of_a_round_commits_once(unit_ctx) -> None:
    job_id = stage(unit_ctx, shards=2)
    results = [shard.train_shard(unit_ctx, job_id, s, 0, 0, 0) for s in range(2)]
    first = aggregator.aggregate_round(unit_ctx, job_id, 0, results)
    second = aggregator.aggregate_round(unit_ctx, job_id, 0, results)
    assert first.committed and not second.committed
    assert unit_ctx.jobs.get(job_id).version == 1
    assert len(unit_ctx.jobs.metrics(job_id)) == 1


def test_corrupt_gradient_blob_is_never_applied_and_its_shard_is_recomputed(unit_ctx) -> None:
    job_id = stage(unit_ctx, shards=2)
    results = [shard.train_shard(unit_ctx, job_id, s, 0, 0, 0) for s in range(2)]
    key = results[1]["key"]
    data = bytearray(unit_ctx.store.get(key))
    data[-5] ^= 0xFF
    unit_ctx.store.put(key, bytes(data))
    with pytest.raises(aggregator.RoundIncomplete) as err:
        aggregator.aggregate_round(unit_ctx, job_id, 0, results)
    assert err.value.recompute == [1]
    assert "blake3 mismatch" in str(err.value)
    assert not unit_ctx.store.exists(key)  # removed, so it can never be applied
    assert unit_ctx.jobs.get(job_id).version == 0
    events = [e for e in unit_ctx.jobs.events(job_id) if e["kind"] == "rejected"]
    assert events and events[0]["shard"] == "1"


def test_sync_round_blob_is_identical_when_a_shard_task_is_redelivered(unit_ctx) -> None:
    job_id = stage(unit_ctx, shards=2)
    a = shard.train_shard(unit_ctx, job_id, 0, 0, 0, 0)
    unit_ctx.checkpoints = type(unit_ctx.checkpoints)(4)  # a different worker: cold caches
    unit_ctx.data = type(unit_ctx.data)(64)
    b = shard.train_shard(unit_ctx, job_id, 0, 0, 0, 0)
    assert a["sha256"] == b["sha256"]


def test_digits_split_is_fixed_and_seeded() -> None:
    a, b = load_digits(), load_digits()
    assert a.n_train == 1438 and a.x_test.shape == (359, 1, 8, 8)
    assert torch.equal(a.y_test, b.y_test)
    assert blobs.sha256_hex(a.x_train.numpy().tobytes()) == blobs.sha256_hex(b.x_train.numpy().tobytes())


def test_nan_gradient_is_rejected_with_a_reason_never_applied_and_the_round_goes_on(unit_ctx, monkeypatch) -> None:
    from pipeline import training

    job_id = stage(unit_ctx, shards=2)
    real = training.gradient

    def poisoned(model, x, y, *a, **k):
        r = real(model, x, y, *a, **k)
        if x.shape[0] and float(x.sum()) == poisoned.target:
            r.update["fc2.bias"][0] = float("nan")
        return r

    from workers import shard as shard_mod

    rows = [shard.train_shard(unit_ctx, job_id, s, 0, 0, 0) for s in range(2)]
    monkeypatch.setattr(shard_mod, "gradient", poisoned)
    unit_ctx.data = type(unit_ctx.data)(64)
    x1, _ = unit_ctx.split(unit_ctx.manifest(unit_ctx.jobs.get(job_id).fields["manifest"]).shards[1], job_id)
    from pipeline.data import batch_rows, batches_per_epoch

    sizes = unit_ctx.manifest(unit_ctx.jobs.get(job_id).fields["manifest"]).shard_sizes
    poisoned.target = float(x1[batch_rows(sizes[1], 16, 0, batches_per_epoch(sizes, 16), 0, 1)].sum())
    bad = shard.train_shard(unit_ctx, job_id, 1, 0, 0, 1)
    assert "NaN or Inf" in bad["rejected"] and "key" not in bad
    outcome = aggregator.aggregate_round(unit_ctx, job_id, 0, [rows[0], bad])
    assert outcome.committed
    assert unit_ctx.jobs.consumed(job_id, 1) == {keys.gradient_identity(job_id, 0, 0, 0)}
    assert any(e["kind"] == "rejected" and e["shard"] == "1" for e in unit_ctx.jobs.events(job_id))


def test_topk_error_feedback_residual_is_kept_per_job_and_shard_and_used_on_the_next_step(unit_ctx) -> None:
    job_id = stage(unit_ctx, shards=1, codec="topk", codec_density=0.01, codec_state="process")
    shard.train_shard(unit_ctx, job_id, 0, 0, 0, 0)
    residual = unit_ctx.residuals[(job_id, 0)].residual
    assert sum(float(t.abs().sum()) for t in residual.values()) > 0
    with_feedback = shard.train_shard(unit_ctx, job_id, 0, 0, 1, 0)
    unit_ctx.residuals.clear()  # as on a worker that never saw this shard: in "process" mode the state is gone
    without = shard.train_shard(unit_ctx, job_id, 0, 0, 1, 0)
    assert with_feedback["sha256"] != without["sha256"]
    assert with_feedback["bytes"] < 0.1 * 4 * 38282  # 1% of the values (plus indices and header)
    assert not list(unit_ctx.store.list(keys.codec_states_prefix(job_id)))


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_a_shard_that_moves_to_a_fresh_worker_continues_from_its_stored_error_feedback(unit_ctx, momentum) -> None:
    job_id = stage(unit_ctx, shards=1, codec="topk", codec_density=0.01, codec_momentum=momentum,
                   codec_state="store")
    shard.train_shard(unit_ctx, job_id, 0, 0, 0, 0)
    assert unit_ctx.store.exists(keys.codec_state(job_id, 0, 0))
    warm = shard.train_shard(unit_ctx, job_id, 0, 0, 1, 0)
    unit_ctx.residuals.clear()  # another worker process: the state comes from the store
    moved = shard.train_shard(unit_ctx, job_id, 0, 0, 1, 0)
    assert moved["sha256"] == warm["sha256"]
    assert int(unit_ctx.jobs.get(job_id).fields["bytes_state"]) > 0  # written twice and read once, counted


def test_local_clipping_holds_each_shards_update_to_the_norm_over_root_shards(unit_ctx) -> None:
    """DGC local gradient clipping: with N shards each clips its gradient at codec_clip_norm / sqrt(N), so the sum
    of the N is held as sync training's clip would hold it."""
    from pipeline import codecs

    job_id = stage(unit_ctx, shards=4, codec="topk", codec_density=1.0, codec_clip_norm=0.2)
    for s in range(4):
        out = shard.train_shard(unit_ctx, job_id, s, 0, 0, 0)
        blob = blobs.decode(unit_ctx.store.get(out["key"]))
        update = codecs.decode(blob.tensors, blob.meta["codec"], out["key"])
        norm = sum(float(t.square().sum()) for t in update.values()) ** 0.5
        assert norm == pytest.approx(0.2 / 2, rel=1e-4), s  # digits' gradient at v0 is far above 0.1


def test_a_redelivered_topk_task_reads_the_state_of_its_own_step_and_writes_the_same_bytes(unit_ctx) -> None:
    job_id = stage(unit_ctx, shards=1, codec="topk", codec_density=0.01, codec_momentum=0.9, codec_state="store")
    shard.train_shard(unit_ctx, job_id, 0, 0, 0, 0)
    first = shard.train_shard(unit_ctx, job_id, 0, 0, 1, 0)
    state_1 = unit_ctx.store.get(keys.codec_state(job_id, 0, 1))
    shard.train_shard(unit_ctx, job_id, 0, 0, 2, 0)  # the shard has moved on to step 2
    again = shard.train_shard(unit_ctx, job_id, 0, 0, 1, 0)  # step 1 redelivered
    assert again["sha256"] == first["sha256"]
    assert unit_ctx.store.get(keys.codec_state(job_id, 0, 1)) == state_1
    assert unit_ctx.residuals[(job_id, 0)].step == 2  # the redelivery did not roll the process's state back


def test_in_process_mode_a_worker_continues_from_the_older_residual_it_still_holds_for_the_shard(unit_ctx) -> None:
    """Shard 0 ran here at step 0, elsewhere at step 1, and comes back here at step 2: the step-0 residual was never
    sent by anyone, so step 2 starts from it (as if step 1 had continued from zero) instead of dropping it."""
    job_id = stage(unit_ctx, shards=1, codec="topk+q4", codec_density=0.01, codec_state="process")
    shard.train_shard(unit_ctx, job_id, 0, 0, 0, 0)
    held = unit_ctx.residuals[(job_id, 0)]
    assert held.step == 0
    back = shard.train_shard(unit_ctx, job_id, 0, 0, 2, 0)
    unit_ctx.residuals.clear()
    fresh = shard.train_shard(unit_ctx, job_id, 0, 0, 2, 0)
    assert back["sha256"] != fresh["sha256"]
    unit_ctx.residuals[(job_id, 0)] = held  # the same older state again: the same bytes
    assert shard.train_shard(unit_ctx, job_id, 0, 0, 2, 0)["sha256"] == back["sha256"]


def test_in_process_mode_a_newer_held_residual_is_never_sent_again(unit_ctx) -> None:
    job_id = stage(unit_ctx, shards=1, codec="topk+q4", codec_density=0.01, codec_state="process")
    shard.train_shard(unit_ctx, job_id, 0, 0, 0, 0)
    shard.train_shard(unit_ctx, job_id, 0, 0, 1, 0)
    shard.train_shard(unit_ctx, job_id, 0, 0, 2, 0)  # the process holds step 2's state
    redelivered = shard.train_shard(unit_ctx, job_id, 0, 0, 1, 0)  # step 1 again: step 2's residual is not its input
    unit_ctx.residuals.clear()
    assert redelivered["sha256"] == shard.train_shard(unit_ctx, job_id, 0, 0, 1, 0)["sha256"]


def test_a_kept_inner_adamw_state_is_the_shards_next_rounds_start_and_a_reset_keeps_none(unit_ctx) -> None:
    spec = {"shards": 1, "local_steps": 2, "inner_optimizer": "adamw", "inner_lr": 1e-3, "codec_state": "process",
            "inner_state": "keep"}
    job_id = stage(unit_ctx, **spec)
    shard.train_shard(unit_ctx, job_id, 0, 0, 0, 0)
    held = unit_ctx.residuals[(job_id, 0)]
    assert held.step == 0 and held.residual is None
    assert {float(v) for k, v in held.inner.items() if k.endswith(".step")} == {2.0}  # AdamW's count: H steps
    kept = shard.train_shard(unit_ctx, job_id, 0, 0, 2, 0)  # the shard's next round (step 0 + H)
    assert unit_ctx.residuals[(job_id, 0)].step == 2
    unit_ctx.residuals.clear()  # a worker that never ran the shard starts its AdamW afresh
    fresh = shard.train_shard(unit_ctx, job_id, 0, 0, 2, 0)
    assert kept["sha256"] != fresh["sha256"]
    assert not list(unit_ctx.store.list(keys.codec_states_prefix(job_id)))

    reset_id = stage(unit_ctx, **{**spec, "inner_state": "reset"})
    shard.train_shard(unit_ctx, reset_id, 0, 0, 0, 0)
    assert (reset_id, 0) not in unit_ctx.residuals
    reset = shard.train_shard(unit_ctx, reset_id, 0, 0, 2, 0)
    tensors = [blobs.decode(unit_ctx.store.get(r["key"])).tensors for r in (reset, fresh)]
    assert tensors[0].keys() == tensors[1].keys()
    assert all(torch.equal(tensors[0][k], tensors[1][k]) for k in tensors[0])  # reset = a fresh start, each round


@pytest.mark.parametrize("inner, kept_key", [({"inner_optimizer": "adamw", "inner_lr": 1e-3}, "exp_avg_sq"),
                                              ({"inner_momentum": 0.9, "inner_lr": 0.05}, "momentum_buffer")])
def test_a_shard_that_moves_continues_from_its_stored_inner_state_and_its_error_feedback(
        unit_ctx, inner: dict, kept_key: str) -> None:
    job_id = stage(unit_ctx, shards=1, local_steps=2, inner_state="keep", codec="topk+q2", codec_density=0.05,
                   codec_state="store", **inner)
    shard.train_shard(unit_ctx, job_id, 0, 0, 0, 0)
    stored = blobs.decode(unit_ctx.store.get(keys.codec_state(job_id, 0, 0))).tensors
    assert any(k.startswith("o.") and k.endswith(kept_key) for k in stored) and any(k.startswith("r.") for k in stored)
    warm = shard.train_shard(unit_ctx, job_id, 0, 0, 2, 0)
    unit_ctx.residuals.clear()  # another worker process: both states come from the store
    moved = shard.train_shard(unit_ctx, job_id, 0, 0, 2, 0)
    assert moved["sha256"] == warm["sha256"]


@pytest.mark.parametrize("every", [1, 4])
def test_a_rounds_blobs_are_deleted_once_the_version_after_next_is_committed(unit_ctx, every: int) -> None:
    """Round v's blobs serve the replay of version v+1 (workers/replay.py) while round v+1 computes; once
    version v+2 is committed nothing reads them, unless the job rebuilds versions from blobs (every > 1)."""
    job_id = stage(unit_ctx, shards=2, checkpoint_every_versions=every)
    spec = JobSpec.model_validate(unit_ctx.jobs.get(job_id).spec)

    def rounds_stored() -> set[int]:
        return {keys.parse_gradient(k).version for k in unit_ctx.store.list(keys.gradients_prefix(job_id))}

    for v in range(3):
        results = [shard.train_shard(unit_ctx, job_id, s, v, v, 0) for s in range(2)]
        assert aggregator.aggregate_round(unit_ctx, job_id, v, results).committed
        aggregator.drop_spent_round(unit_ctx, job_id, spec, v)  # as the aggregation task does after its commit
        if v == 0:
            assert rounds_stored() == {0}
    assert rounds_stored() == ({2} if every == 1 else {0, 1, 2})


@pytest.mark.parametrize("every", [1, 2])
def test_a_succeeded_job_leaves_no_update_blob_or_codec_state_and_keeps_every_version(unit_ctx, run_published,
                                                                                      every: int) -> None:
    """Once the job has succeeded nothing reads its last rounds' blobs or its shards' error feedback again; every
    version stays reconstructable (checkpoints, and with every > 1 the blobs its recipes name)."""
    from workers import lifecycle

    job_id = stage(unit_ctx, shards=2, batch_size=512, epochs=1, codec="topk", codec_state="store",
                   checkpoint_every_versions=every)
    job = unit_ctx.jobs.get(job_id)
    spec = JobSpec.model_validate(job.spec)
    total = job.total_rounds
    assert total >= 2
    for v in range(total):
        results = [shard.train_shard(unit_ctx, job_id, s, v, v, 0) for s in range(2)]
        assert aggregator.aggregate_round(unit_ctx, job_id, v, results).committed
        aggregator.drop_spent_round(unit_ctx, job_id, spec, v)

    def stored(prefix: str) -> list[str]:
        return list(unit_ctx.store.list(prefix))

    assert stored(keys.gradients_prefix(job_id)) and stored(keys.codec_states_prefix(job_id))
    lifecycle.advance(unit_ctx, job_id)
    assert unit_ctx.jobs.get(job_id).status != "succeeded"  # its last version is not evaluated yet: all stays
    assert stored(keys.codec_states_prefix(job_id))
    run_published(unit_ctx)
    assert unit_ctx.jobs.get(job_id).status == "succeeded"
    assert stored(keys.codec_states_prefix(job_id)) == []
    blobs_kept = {keys.parse_gradient(k).version for k in stored(keys.gradients_prefix(job_id))}
    assert blobs_kept == (set() if every == 1 else set(range(total)))
    listed = stored(keys.checkpoint_prefix(job_id))
    kept = keys.checkpoint_versions(listed) + keys.recipe_versions(listed)
    assert sorted(kept) == list(range(total + 1))
