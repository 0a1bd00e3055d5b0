"""The aggregator's work in async mode: accept each shard result on arrival, one at a time per job.

Buffered asynchronous aggregation (FedBuff, Nguyen et al. 2022): accepted updates collect in ``pending``;
every K of them (``publish_every``, by default the number of shards) make version N+1 by ONE optimizer step
on their sample-weighted mean, so a version moves the weights as far as a sync round does and async runs at
the sync job's learning rate. Bounded staleness (Ho et al. 2013): s = current version − the version the
update was computed on; s > max_staleness → dropped and the step issued again on the newest version;
otherwise the update's weight in the mean is scaled by the staleness rule (1/(1+s), Zhang et al. 2016, or 1).
Two more corrections keep async close to sync with stragglers (measured in docs/benchmarks.md): delay
compensation (DC-ASGD-a, Zheng et al. 2017; ``delay_compensation``) corrects a stale gradient by the weights'
drift since it was computed, and the step's momentum loses the implicit momentum asynchrony adds, s̄/(1+s̄)
(Mitliagkas et al. 2016; ``staleness_momentum``).

Which steps are computed, and in which order, is ``pipeline/async_plan.py``: one global order over the
shards' steps, a few in flight at once on whichever workers are free, so a slow worker neither holds back
the others nor skews which data the model sees.

Exactly once: the job records, per shard, the steps it still awaits (a mark, and the steps accepted above
it). An update is accepted only for an awaited step, atomically with recording it and appending the update
to ``pending``; a version is published (checkpoint, then ``commit_version``, which also trims ``pending``)
every K accepted updates. A crash anywhere re-derives the same state from the last checkpoint plus
``pending``, whose blobs stay in the store; a redelivered result finds its step already accepted. Once a
version is committed the blobs it applied are deleted (``drop_applied``): the version itself is stored whole.
"""

from __future__ import annotations

import time
from typing import Any

import redis
import torch

from pipeline import blobs
from pipeline.aggregate import (
    Accumulator,
    UpdateRejected,
    delay_compensated,
    sgd_step,
    staleness_lr,
    staleness_momentum,
)
from pipeline.reasons import reason_code
from pipeline.spec import JobSpec
from storage import keys
from storage.jobstate import TERMINAL
from workers import faults
from workers.aggregator import opt_hparams
from workers.commit import commit_next_version
from workers.context import Context
from workers.lifecycle import advance
from workers.metrics import observe_rejected
from workers.updates import KeyRefused, check_gradient_key, drop_blobs, load_update

DC_SLOT = "dc_mean_square"  # the optimizer slot of delay compensation's moving mean square


class JobBusy(Exception):
    """Another aggregation of the same job holds its lock; retry shortly."""


def apply_update(ctx: Context, job_id: str, result: dict[str, Any]) -> dict[str, Any]:
    if isinstance(result, dict) and "rejected" in result:
        return skip_rejected(ctx, job_id, result)
    if not isinstance(result, dict) or "key" not in result:
        return {"ignored": result}
    lock = ctx.redis.lock(keys.job_lock(job_id), timeout=300, blocking_timeout=5)
    if not lock.acquire():
        raise JobBusy(f"job {job_id} is being aggregated elsewhere")
    try:
        outcome = _apply_locked(ctx, job_id, result)
        applied = publish_if_due(ctx, job_id)
        advance(ctx, job_id)  # the next steps go out first: dropping blobs is off their path
        drop_applied(ctx, job_id, applied)
        return outcome
    finally:
        try:
            lock.release()
        except redis.exceptions.LockError:
            pass


def skip_rejected(ctx: Context, job_id: str, result: dict[str, Any]) -> dict[str, Any]:
    """A shard refused its own update (NaN/Inf): move that shard past the step, apply nothing."""
    spec = JobSpec.model_validate(ctx.jobs.get(job_id).spec)
    shard, step = int(result["shard"]), int(result["step"])
    # The step is consumed (it counts towards the budget, so a diverged model cannot loop forever).
    ctx.jobs.accept_update(job_id, shard=shard, step=step, local_steps=spec.local_steps, entry=None)
    advance(ctx, job_id)
    return {"shard": shard, "step": step, "outcome": "rejected", "reason": result["rejected"]}


def _apply_locked(ctx: Context, job_id: str, result: dict[str, Any]) -> dict[str, Any]:
    job = ctx.jobs.get(job_id)
    if job.status in TERMINAL:
        return {"ignored": job.status}
    spec = JobSpec.model_validate(job.spec)
    shard, step, base, key = int(result["shard"]), int(result["step"]), int(result["version"]), str(result["key"])
    budget = int(job.fields.get("budget", 0))
    if not ctx.jobs.awaits(job_id, shard, step) or int(job.fields.get("accepted", 0)) >= budget:
        return {"shard": shard, "step": step, "outcome": "duplicate"}
    staleness = job.version - base
    if staleness > spec.max_staleness or staleness < 0:
        reason = f"staleness {staleness} exceeds max_staleness {spec.max_staleness}"
        ctx.jobs.event(job_id, "dropped", shard=shard, step=step, base_version=base, reason=reason)
        observe_rejected("stale")
        _reissue(ctx, job_id, shard, step)
        if _names_own_blob(job_id, shard, base, key):  # never applied (its step is issued again): an orphan else
            drop_blobs(ctx, job_id, [key])
        return {"shard": shard, "step": step, "outcome": "stale", "staleness": staleness}
    ckpt = ctx.checkpoint(keys.checkpoint(job_id, job.version), job_id)
    params = {n: t for n, t in ckpt.state.items() if n in ctx.param_names(ckpt)}
    try:
        upd = load_update(ctx, job_id, key, str(result.get("sha256")), _shapes(params),
                          {"job": job_id, "shard": shard, "base_version": base, "step": step})
    except (blobs.BlobError, UpdateRejected) as e:
        ctx.jobs.event(job_id, "rejected", shard=shard, step=step, reason=str(e))
        observe_rejected(reason_code(e))
        if not isinstance(e, KeyRefused):  # never delete what a result merely named outside its job
            ctx.store.delete(key)
        _reissue(ctx, job_id, shard, step)
        return {"shard": shard, "step": step, "outcome": "rejected", "reason": str(e)}
    entry = {"identity": upd.identity, "key": key, "sha256": result.get("sha256"), "shard": shard, "step": step,
             "base_version": base, "staleness": staleness, "scale": staleness_lr(1.0, staleness, spec.staleness_rule),
             "samples": upd.samples, "loss": upd.loss}
    accepted = ctx.jobs.accept_update(job_id, shard=shard, step=step, local_steps=spec.local_steps, entry=entry)
    if accepted:
        ctx.update_cache.put(upd.identity, upd)
    faults.point("aggregator.after_accept", ctx.redis, job_id)
    return {"shard": shard, "step": step, "outcome": "applied" if accepted else "duplicate", "staleness": staleness}


def _names_own_blob(job_id: str, shard: int, base: int, key: str) -> bool:
    """Whether `key` is the blob of a result of (`shard`, base version `base`) of this job: what a dropped result
    may have deleted, unread (a key outside the job's gradients, or of another step, never is)."""
    try:
        check_gradient_key(job_id, key)
    except KeyRefused:
        return False
    g = keys.parse_gradient(key)
    return g is not None and (g.job, g.shard, g.version) == (job_id, shard, base)


def _shapes(params: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {n: tuple(t.shape) for n, t in params.items()}


def _reissue(ctx: Context, job_id: str, shard: int, step: int) -> None:
    """The step's result was dropped: forget that it is in flight, so it is issued again (a new attempt)."""
    ctx.redis.hdel(keys.job_issued(job_id), f"{shard}@{step}")


def publish_if_due(ctx: Context, job_id: str) -> list[str]:
    """Fold pending updates into version N+1 when K have accumulated (or the budget is spent). Returns the keys
    of the update blobs the committed version applied (none when nothing was committed)."""
    job = ctx.jobs.get(job_id)
    if job.status in TERMINAL:
        return []
    spec = JobSpec.model_validate(job.spec)
    pending = ctx.jobs.pending(job_id)
    budget_spent = int(job.fields.get("accepted", 0)) >= int(job.fields.get("budget", 0))
    if not pending or (len(pending) < spec.publish_every and not budget_spent):
        return []
    t0 = time.perf_counter()
    version = job.version
    ckpt = ctx.checkpoint(keys.checkpoint(job_id, version), job_id, with_opt=True)
    names = ctx.param_names(ckpt)
    params = {n: t for n, t in ckpt.state.items() if n in names}
    bufs = dict(ckpt.opt.get("momentum", {}))
    lam = spec.delay_compensation
    mean_square = {n: t.clone() for n, t in ckpt.opt.get(DC_SLOT, {}).items()} if lam else {}
    acc = Accumulator(_shapes(params))
    for e in pending:
        upd = ctx.update_cache.get(e["identity"])
        if upd is None:  # a restarted aggregator: re-read (and re-verify) the recorded blob
            upd = load_update(ctx, job_id, e["key"], e.get("sha256"), _shapes(params),
                              {"job": job_id, "shard": e["shard"], "base_version": e["base_version"]})
        tensors = upd.tensors
        if lam:
            tensors = delay_compensated(tensors, params, _weights_at(ctx, job_id, int(e["base_version"]), version,
                                                                     params), mean_square, lam)
        for name, t in tensors.items():  # Σ scale_i·n_i·g_i: a stale update weighs less (FedBuff)
            acc.fold(name, 0, t.reshape(-1), float(e["scale"]) * upd.samples)
        acc.count(upd)
    mean, _, _ = acc.mean()
    staleness = [int(e["staleness"]) for e in pending]
    hp = opt_hparams(spec, version, job.total_rounds)
    hp["momentum"] = staleness_momentum(float(hp["momentum"]), staleness, spec.staleness_momentum)
    params, bufs = sgd_step(params, mean, bufs, **hp)
    samples = sum(int(e["samples"]) for e in pending)
    extra = {"train_loss": sum(float(e["loss"]) * int(e["samples"]) for e in pending) / max(1, samples),
             "samples": samples, "updates": len(pending), "staleness_mean": sum(staleness) / len(pending),
             "lr": hp["lr"], "momentum": hp["momentum"]}
    done = commit_next_version(ctx, job, ckpt, {**ckpt.state, **params}, bufs, [e["identity"] for e in pending],
                               mode="async", started=t0, extra_metrics=extra, pending_consumed=len(pending),
                               staleness=staleness, extra_opt={DC_SLOT: mean_square})
    return [str(e["key"]) for e in pending] if done.committed else []


def drop_applied(ctx: Context, job_id: str, blob_keys: list[str]) -> None:
    """Delete the update blobs a committed async version applied. Nothing reads them again: an async version is
    stored whole (weights and optimizer state), a restarted aggregator re-reads only the updates still pending,
    and a redelivered result finds its step already accepted without reading its blob. Kept, every version's
    blobs (a model's size each) grew the store without bound, and on a local disk their write-back competed with
    the checkpoints' fsyncs on the commit path (docs/benchmarks.md)."""
    drop_blobs(ctx, job_id, blob_keys)


def _weights_at(ctx: Context, job_id: str, base: int, version: int, now: dict[str, torch.Tensor]
                ) -> dict[str, torch.Tensor]:
    """The weights an update was computed on: version `base`'s (the current ones when it is `version`)."""
    if base == version:
        return now
    ckpt = ctx.checkpoint(keys.checkpoint(job_id, base), job_id)
    return {n: ckpt.state[n] for n in now}
