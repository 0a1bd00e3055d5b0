"""The job's learning-rate schedule (lr_schedule, lr_warmup_versions): the closed form against torch's schedulers,
and every path that steps with it: a sync job against a single-process torch loop, replayed versions, async
versions, and the inner lr of local steps."""

from __future__ import annotations

import pytest
import torch

from pipeline import blobs
from pipeline.aggregate import lr_factor
from pipeline.checkpoint import decode_checkpoint
from pipeline.client import Client
from pipeline.data import batch_rows, batches_per_epoch
from pipeline.training import loss_fn
from storage import keys
from storage.datastore import Manifest, read_split
from workers import aggregator, async_agg, shard


def torch_factors(total: int, warmup: int, schedule: str) -> list[float]:
    """torch's own schedulers over `total` steps: LinearLR for the warm-up, then CosineAnnealingLR (or nothing)."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    after = (torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total - warmup) if schedule == "cosine"
             else torch.optim.lr_scheduler.ConstantLR(opt, factor=1.0, total_iters=0))
    sched = after if not warmup else torch.optim.lr_scheduler.SequentialLR(
        opt, [torch.optim.lr_scheduler.LinearLR(opt, start_factor=1 / (warmup + 1), total_iters=warmup), after],
        milestones=[warmup])
    out = []
    for _ in range(total):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


@pytest.mark.parametrize("schedule,warmup", [("cosine", 0), ("cosine", 4), ("constant", 3)])
def test_lr_factor_is_torchs_linear_warm_up_then_cosine_annealing_in_closed_form(schedule: str, warmup: int) -> None:
    total = 20
    want = torch_factors(total, warmup, schedule)
    got = [lr_factor(schedule, t, total, warmup) for t in range(total)]
    assert got == pytest.approx(want, rel=1e-9, abs=1e-12)
    if schedule == "cosine":
        assert got[warmup] == 1.0 and 0 < got[-1] < 0.01  # from the full rate down towards 0 at the last step
    assert lr_factor(schedule, total + 5, total, warmup) >= 0  # a step past the plan never goes negative


def test_an_unknown_schedule_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="unknown lr_schedule 'step'"):
        lr_factor("step", 3, 10)


def client(unit_ctx) -> Client:
    return Client(unit_ctx.settings, store=unit_ctx.store, redis_client=unit_ctx.redis, dispatch=unit_ctx.dispatch)


def test_a_sync_job_on_a_cosine_schedule_equals_torch_sgd_with_its_schedulers_step_for_step(unit_ctx) -> None:
    spec = {"shards": 1, "batch_size": 16, "epochs": 1, "lr": 0.1, "momentum": 0.9, "lr_schedule": "cosine",
            "lr_warmup_versions": 2}
    job_id = client(unit_ctx).stage(spec)
    job = unit_ctx.jobs.get(job_id)
    manifest = Manifest.from_json(unit_ctx.store.get(job.fields["manifest"]))
    x, y, _ = read_split(unit_ctx.store, manifest.shards[0])
    bpe = batches_per_epoch(manifest.shard_sizes, 16)
    model = decode_checkpoint(unit_ctx.store.get(keys.checkpoint(job_id, 0)), "v0").build()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    total = job.total_rounds
    want_lr = [0.1 * f for f in torch_factors(total, 2, "cosine")]
    steps = 5
    for v in range(steps):
        result = shard.train_shard(unit_ctx, job_id, 0, v, v, 0)
        assert aggregator.aggregate_round(unit_ctx, job_id, v, [result]).committed
        for group in opt.param_groups:
            group["lr"] = want_lr[v]
        opt.zero_grad()
        rows = batch_rows(manifest.shard_sizes[0], 16, v, bpe, 0, 0)
        loss_fn(model(x[rows]), y[rows]).backward()
        opt.step()
    got = decode_checkpoint(unit_ctx.store.get(keys.checkpoint(job_id, steps)), "got").state
    for name, p in model.named_parameters():
        assert (got[name] - p.detach()).abs().max().item() <= 1e-5, name
    recorded = [m["lr"] for m in unit_ctx.jobs.metrics(job_id)]
    assert recorded == pytest.approx(want_lr[:steps], rel=1e-9)
    assert recorded[0] == pytest.approx(0.1 / 3)  # the first warm-up step: lr/(warmup+1)


def test_an_async_version_steps_at_the_scheduled_lr_as_the_sync_round_does(unit_ctx) -> None:
    spec = {"shards": 2, "batch_size": 64, "epochs": 1, "publish_every_versions": 0, "lr_schedule": "cosine",
            "lr_warmup_versions": 3}
    a = client(unit_ctx).stage({**spec, "mode": "async"})
    s = client(unit_ctx).stage({**spec, "mode": "sync"})
    const = client(unit_ctx).stage({**spec, "mode": "sync", "lr_schedule": "constant", "lr_warmup_versions": 0})
    for shard_id in range(2):
        assert async_agg.apply_update(unit_ctx, a, shard.train_shard(unit_ctx, a, shard_id, 0, 0, 0))["outcome"] == (
            "applied")
    for job in (s, const):
        aggregator.aggregate_round(unit_ctx, job, 0, [shard.train_shard(unit_ctx, job, i, 0, 0, 0) for i in range(2)])
    got, want, full = (decode_checkpoint(unit_ctx.store.get(keys.checkpoint(j, 1)), j).state for j in (a, s, const))
    for name in want:
        assert torch.allclose(got[name], want[name], atol=1e-6), name
    assert any(not torch.allclose(want[n], full[n], atol=1e-6) for n in want)  # the warm-up's quarter step differs
    assert unit_ctx.jobs.metrics(a)[0]["lr"] == pytest.approx(0.05 / 4)


def test_local_steps_take_the_inner_lr_from_the_schedule_by_round(unit_ctx) -> None:
    base = {"shards": 2, "batch_size": 16, "local_steps": 2, "momentum": 0.0}
    warm = client(unit_ctx).stage({**base, "inner_lr": 0.05, "lr_warmup_versions": 1})
    half = client(unit_ctx).stage({**base, "inner_lr": 0.025})
    full = client(unit_ctx).stage({**base, "inner_lr": 0.05})

    def update(job_id: str) -> dict[str, torch.Tensor]:
        r = shard.train_shard(unit_ctx, job_id, 0, 0, 0, 0)
        return blobs.decode(unit_ctx.store.get(r["key"]), r["key"]).tensors

    got, want, other = update(warm), update(half), update(full)
    for name in want:  # round 0 of a one-version warm-up runs at half the inner lr
        assert torch.equal(got[name], want[name]), name
    assert any(not torch.equal(got[n], other[n]) for n in want)
