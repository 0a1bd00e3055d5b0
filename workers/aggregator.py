"""The aggregator's work for a sync round: verify the set of shard blobs, average, step, checkpoint, commit.

Exactly once: the version bump (``JobStore.commit_version``) is the commit point; it records the
identities of the blobs consumed, and refuses when the job already moved on. Everything before it is
deterministic and idempotent (the checkpoint for N+1 is the same bytes however often it is written),
so a crash at any point followed by redelivery commits the same version once.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from pipeline import blobs, codecs
from pipeline.aggregate import Update, UpdateRejected, check_update, select_round, sgd_step, weighted_mean
from pipeline.data import total_rounds
from pipeline.reasons import reason_code
from pipeline.spec import JobSpec
from storage import keys
from storage.jobstate import TERMINAL
from storage.objectstore import ObjectNotFound
from workers import faults
from workers.commit import Commit, commit_next_version
from workers.context import Context
from workers.metrics import observe_rejected

log = logging.getLogger(__name__)


class RoundIncomplete(Exception):
    """Some shards' blobs are missing or bad; the round is retried after they are (re)computed."""

    def __init__(self, reasons: list[str], recompute: list[int]) -> None:
        super().__init__("; ".join(reasons))
        self.reasons = reasons
        self.recompute = recompute


def opt_hparams(spec: JobSpec) -> dict[str, Any]:
    if spec.local_steps > 1:  # DiLoCo outer optimizer: Nesterov momentum on the mean pseudo-gradient
        return {"lr": spec.outer_lr, "momentum": spec.outer_momentum, "nesterov": True, "weight_decay": 0.0}
    return {"lr": spec.lr, "momentum": spec.momentum, "nesterov": spec.nesterov, "weight_decay": spec.weight_decay}


class KeyRefused(blobs.BlobError):
    """A result named an object outside its job's gradient prefix: refused unread, and never deleted."""

    default_code = "other"


def check_gradient_key(job_id: str, key: str) -> None:
    """A shard result may only point into its own job's gradients (no other job's, no checkpoint, no '..')."""
    prefix = keys.gradients_prefix(job_id)
    if not key.startswith(prefix) or "\\" in key or any(p in ("", ".", "..") for p in key.split("/")):
        raise KeyRefused(key, f"outside job {job_id}'s gradient prefix {prefix}: refused unread")


def load_update(ctx: Context, job_id: str, key: str, sha256: str | None, params: dict[str, torch.Tensor],
                expect: dict[str, int]) -> Update:
    """Fetch, verify (key, sha256, signature, identity, codec, shapes, finiteness) and decode one blob."""
    check_gradient_key(job_id, key)
    data = ctx.store.get(key)
    ctx.jobs.add_bytes(job_id, down=len(data))
    if len(data) > ctx.settings.max_blob_bytes:
        raise blobs.BlobError(key, f"{len(data)} bytes exceeds the limit of {ctx.settings.max_blob_bytes}",
                              code="too_large")
    if sha256 is not None and blobs.sha256_hex(data) != sha256:
        raise blobs.BlobError(key, "sha256 differs from what the shard task reported")
    blob = blobs.decode(data, key, signing_key=ctx.signing_key)
    m = blob.meta
    for field, want in expect.items():
        if m.get(field) != want:
            raise blobs.BlobError(key, f"header {field}={m.get(field)!r}, expected {want!r}")
    shapes = {n: tuple(p.shape) for n, p in params.items()}
    try:
        tensors = codecs.decode(blob.tensors, m.get("codec") or {}, key, expected_shapes=shapes)
    except codecs.CodecError as e:
        raise blobs.BlobError(key, str(e), code=e.code) from None
    check_update(tensors, params, key)
    ident = keys.gradient_identity(job_id, int(m["shard"]), int(m["base_version"]), int(m["attempt"]))
    return Update(ident, int(m["shard"]), tensors, int(m["samples"]), float(m["loss"]))


def _find_blob(ctx: Context, job_id: str, version: int, shard: int) -> str | None:
    found = [(g.attempt, k) for k in ctx.store.list(keys.gradient_attempts(job_id, version, shard))
             if (g := keys.parse_gradient(k)) is not None]
    return max(found, default=(0, None))[1]  # the newest attempt, by number ("a10" sorts before "a2" as text)


def collect_round(ctx: Context, job_id: str, spec: JobSpec, version: int, results: list[Any],
                  params: dict[str, torch.Tensor]) -> list[Update]:
    """One verified update per shard, by shard identity (never by count)."""
    shards = list(range(spec.shards))
    by_shard, missing = select_round(results, shards)
    reasons: list[str] = []
    recompute: list[int] = []
    updates: list[Update] = []
    for s in shards:
        r = by_shard.get(s)
        if r is not None and "rejected" in r:
            continue  # the shard worker refused its own update (NaN/Inf): weight 0 this round
        key = str(r["key"]) if r is not None and "key" in r else _find_blob(ctx, job_id, version, s)
        sha = str(r["sha256"]) if r is not None and "sha256" in r else None
        if key is None:
            reasons.append(f"shard {s}: no result and no blob under version {version}")
            continue
        expect = {"job": job_id, "shard": s, "base_version": version}
        try:
            try:
                updates.append(load_update(ctx, job_id, key, sha, params, expect))
            except ObjectNotFound:
                # Rejected (and deleted) on an earlier try: the recomputed attempt takes its place. A retry
                # gets the same chord results, which still name the deleted attempt.
                newer = _find_blob(ctx, job_id, version, s)
                if newer is None or newer == key:
                    raise
                key = newer
                updates.append(load_update(ctx, job_id, key, None, params, expect))
        except ObjectNotFound as e:
            reasons.append(f"shard {s}: {e}")
            recompute.append(s)
        except (blobs.BlobError, UpdateRejected) as e:
            reasons.append(f"shard {s}: {e}")
            ctx.jobs.event(job_id, "rejected", shard=s, version=version, reason=str(e))
            observe_rejected(reason_code(e))
            if not isinstance(e, KeyRefused):
                ctx.store.delete(key)  # a corrupt blob is never applied; the shard is recomputed
            recompute.append(s)
    if reasons:
        raise RoundIncomplete(reasons, recompute)
    del missing
    if not updates:
        raise UpdateRejected(f"every shard's update of round v{version} was rejected (NaN/Inf): diverged")
    return sorted(updates, key=lambda u: u.shard)


def aggregate_round(ctx: Context, job_id: str, version: int, results: list[Any]) -> Commit:
    t0 = time.perf_counter()
    job = ctx.jobs.get(job_id)
    spec = JobSpec.model_validate(job.spec)
    if job.version > version or job.status in TERMINAL:
        # A duplicate (redelivered or early-fired) aggregation: this round is already committed.
        return Commit(False, job.version, {})
    ckpt = ctx.checkpoint(keys.checkpoint(job_id, version), job_id, with_opt=True)
    model = ckpt.build("cpu")
    params = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    updates = collect_round(ctx, job_id, spec, version, results, params)
    faults.point("aggregator.after_read", ctx.redis, job_id)

    mean, samples, train_loss = weighted_mean(updates)
    new_params, bufs = sgd_step(params, mean, ckpt.opt.get("momentum", {}), **opt_hparams(spec))
    state = {**ckpt.state, **new_params}
    manifest = ctx.manifest(job.fields["manifest"])
    rounds = total_rounds(manifest.shard_sizes, spec.batch_size, spec.epochs, spec.local_steps)
    epoch = round((version + 1) * spec.local_steps / max(1, rounds * spec.local_steps / spec.epochs), 3)
    return commit_next_version(ctx, job, ckpt, state, bufs, [u.identity for u in updates], mode="sync", started=t0,
                               extra_metrics={"train_loss": train_loss, "samples": samples, "epoch": epoch},
                               model=model)
