"""The shard worker's work: load version N and a shard, compute a (pseudo-)gradient, encode, upload.

Returns only the blob's key and a few numbers (the claim-check pattern): Celery never carries tensors.
The work is deterministic in (job, shard, version, step), so a redelivered task writes the same bytes.
"""

from __future__ import annotations

import copy
import math
import time
from typing import Any

import torch

from pipeline import blobs, codecs
from pipeline.aggregate import lr_factor, partition, predict_weights_
from pipeline.data import batch_rows, batches_per_epoch, hash_seed, total_rounds
from pipeline.spec import JobSpec
from pipeline.training import gradient, local_steps
from storage import keys
from storage.jobstate import TERMINAL
from storage.objectstore import ObjectNotFound
from workers import affinity, codec_state, faults, replay
from workers.aggregator import opt_hparams
from workers.context import Context
from workers.metrics import observe_shard_task


def train_shard(ctx: Context, job_id: str, shard: int, version: int, step: int, attempt: int) -> dict[str, Any]:
    """Compute shard `shard`'s update for data step `step` on `version` (−1: the newest), upload it."""
    t0 = time.perf_counter()
    job = ctx.jobs.get(job_id)
    if job.status in TERMINAL:
        return {"shard": shard, "skipped": job.status}
    if version < 0:
        # Async mode: compute on the newest version when the task starts, not the one current when it
        # was queued, so time spent waiting in the queue adds no staleness.
        version = job.version
    spec = JobSpec.model_validate(job.spec)
    manifest = ctx.manifest(job.fields["manifest"])
    device = ctx.device()
    # From version − 1 held here and the round's blobs, where that reads fewer bytes than the weights.
    replayed = version > 0 and replay.advance(ctx, job_id, version, job.fields.get("recipe"), device)
    model = ctx.model(keys.checkpoint(job_id, version), job_id, device, job.spec)  # once per version and process
    if not replayed:
        replay.prime(ctx, job_id, version, job.fields.get("recipe"), device)
    if spec.weight_prediction and version > 0:  # async: the weights this update will be applied to, predicted
        model = predicted_model(ctx, job_id, version, model, spec, job.total_rounds)
    x, y = ctx.split(manifest.shards[shard], job_id)
    t_io = time.perf_counter() - t0

    # A stable hash of the spec's seed (Python's hash() of a str is salted per process by PYTHONHASHSEED: a
    # redelivered task of a model with dropout drew other numbers on another worker). Not the job id: the same
    # spec trains to the same weights, whichever job, worker or fault.
    seed = hash_seed(spec.seed, shard, version, step)
    # The CPU generator, and CUDA's only on CUDA: torch.manual_seed also queues a lazy CUDA seeding, which
    # formats a stack trace every call (~1 ms a task on a small model).
    torch.random.default_generator.manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.manual_seed_all(seed)
    teacher = None
    if spec.kind == "distill":  # the teacher version was pinned at submit: an alias move does not change it
        name, _, version_text = job.fields["teacher"].rpartition("@")
        teacher = ctx.teacher(name, int(version_text), device)
    bpe = batches_per_epoch(manifest.shard_sizes, spec.batch_size)
    size = manifest.shard_sizes[shard]
    batches = []
    for k in range(step, step + spec.local_steps):
        rows = batch_rows(size, spec.batch_size, k, bpe, spec.seed, shard)
        batches.append((x[rows].to(device), y[rows].to(device)))
    # The state the shard's previous task (step − H) left, from this process or the store (workers/codec_state.py):
    # top-k error feedback, and a kept inner optimizer's (DiLoCo keeps each worker's AdamW state across rounds).
    prev_step = step - spec.local_steps if spec.shard_state else -1
    local = codec_state.held(ctx, job_id, shard, prev_step) if prev_step >= 0 else None
    state = codec_state.load(ctx, job_id, shard, prev_step, spec.codec_state)
    t1 = time.perf_counter()
    if spec.local_steps == 1:
        result = gradient(model, *batches[0], teacher, spec.temperature, spec.alpha,
                          micro_batch_size=spec.micro_batch_size, precision=spec.precision)
    else:
        # The inner lr follows the job's schedule by round (its step // H of the job's rounds).
        rounds = total_rounds(manifest.shard_sizes, spec.batch_size, spec.epochs, spec.local_steps)
        lr = spec.inner_lr * lr_factor(spec.lr_schedule, step // spec.local_steps, rounds, spec.lr_warmup_versions)
        result = local_steps(model, batches, optimizer=spec.inner_optimizer, lr=lr, teacher=teacher,
                             temperature=spec.temperature, alpha=spec.alpha,
                             micro_batch_size=spec.micro_batch_size, precision=spec.precision,
                             state=state.inner if spec.keeps_inner_state else None,
                             keep_state=spec.keeps_inner_state, momentum=spec.inner_momentum)
    if ctx.settings.slow_factor > 1:
        time.sleep((time.perf_counter() - t1) * (ctx.settings.slow_factor - 1))
    t_compute = time.perf_counter() - t1

    bad = [n for n, t in result.update.items() if not bool(torch.isfinite(t).all())]
    if bad:
        # A diverged step (NaN/Inf): never uploaded, never applied. The shard contributes nothing to this
        # round (weight 0) and the job goes on; the reason is in the job's events.
        reason = f"shard {shard} step {step} on v{version}: NaN or Inf in {bad[:3]}"
        ctx.jobs.event(job_id, "rejected", shard=shard, version=version, reason=reason)
        return {"shard": shard, "version": version, "step": step, "attempt": attempt, "rejected": reason,
                "samples": 0, "loss": float("nan"), "compute_s": round(t_compute, 4), "io_s": round(t_io, 4)}

    # Top-k's density warms up over the first codec_warmup_epochs (DGC). This worker then holds the shard's state:
    # its next task is routed here while this process lives (workers/affinity.py).
    density = codecs.warmup_density(spec.codec_density, step, round(spec.codec_warmup_epochs * bpe))
    cfg = codecs.CodecConfig(name=spec.codec, momentum=spec.codec_momentum, dense_below=spec.codec_dense_below,
                             density=density, clip_norm=spec.codec_clip_norm / math.sqrt(spec.shards))
    enc = codecs.encode(result.update, cfg, state.residual, state.velocity)
    if codec_state.save(ctx, job_id, shard, step, enc, spec.codec_state, inner=result.inner_state):
        affinity.record(ctx, job_id, shard, step, local=local)
    t2 = time.perf_counter()
    ranges = partition([(n, t.numel()) for n, t in result.update.items()], spec.aggregation_parts)
    out = upload_update(ctx, job_id, shard, version, step, attempt, enc, samples=result.samples, loss=result.loss,
                        ranges=ranges, versions_from_blobs=spec.checkpoint_every_versions > 1)
    t_io += time.perf_counter() - t2
    observe_shard_task(duration_s=time.perf_counter() - t0, samples=result.samples, bytes_up=out["bytes"])
    return {**out, "compute_s": round(t_compute, 4), "io_s": round(t_io, 4), "replayed": replayed}


def predicted_model(ctx: Context, job_id: str, version: int, model: torch.nn.Module, spec: JobSpec,
                    total: int) -> torch.nn.Module:
    """A copy of `model` (version `version`, shared by this process's tasks: left as it is) moved
    ``spec.weight_prediction`` steps ahead along the step that made it: lr·momentum buffer, with the lr of the step
    from `version` − 1 (``predict_weights_``). The buffers are read from beside the checkpoint once per version
    and process (``replay.read_momentum``); a version stored without them (its step had no momentum) is predicted
    as itself. The same on every worker: the task stays deterministic in (job, shard, version, step)."""
    key = keys.checkpoint(job_id, version)
    buffers = ctx.held_momentum(key)
    if buffers is None:
        try:
            buffers = replay.read_momentum(ctx, job_id, key, version)
        except ObjectNotFound:
            buffers = {}  # held too: the next task on this version does not look again
        ctx.hold_momentum(key, buffers)
    if not buffers:
        return model
    predicted = copy.deepcopy(model)
    with torch.no_grad():
        predict_weights_(dict(predicted.named_parameters()), buffers, lr=opt_hparams(spec, version - 1, total)["lr"],
                         steps=spec.weight_prediction)
    return predicted


def upload_update(ctx: Context, job_id: str, shard: int, version: int, step: int, attempt: int,
                  enc: codecs.Encoded, *, samples: int, loss: float, ranges: list[list[str]] | None = None,
                  versions_from_blobs: bool = False) -> dict[str, Any]:
    """Write one encoded update as its gradient blob (one blob per parameter range when the job aggregates
    in parts); return the shard task's result (the claim check). `versions_from_blobs`: the job's versions between
    full checkpoints are rebuilt from its blobs (``checkpoint_every_versions``), so the blob is flushed to disk
    before the task returns (otherwise a blob a power loss tears is only recomputed), and kept in memory for the
    next version's replay whatever its codec (otherwise only compressed ones are: see ``_put_blob``)."""
    meta = {"kind": "gradient", "job": job_id, "shard": shard, "base_version": version, "step": step,
            "attempt": attempt, "samples": samples, "loss": loss, "codec": enc.meta}
    if ranges is not None and len(ranges) > 1:
        blobs_out = []
        for part, names in enumerate(ranges):
            wanted = set(names)
            tensors = {k: t for k, t in enc.tensors.items() if k.rsplit(".", 1)[0] in wanted}
            codec = {**enc.meta, "tensors": {n: enc.meta["tensors"][n] for n in names}}
            one = _put_blob(ctx, job_id, keys.gradient(job_id, version, shard, attempt, part), tensors,
                            {**meta, "codec": codec, "part": part, "parts": len(ranges)}, versions_from_blobs)
            blobs_out.append(one)
        return {"shard": shard, "version": version, "step": step, "attempt": attempt, "key": blobs_out[0]["key"],
                "sha256": blobs_out[0]["sha256"], "parts": blobs_out, "bytes": sum(b["bytes"] for b in blobs_out),
                "samples": samples, "loss": loss}
    one = _put_blob(ctx, job_id, keys.gradient(job_id, version, shard, attempt), enc.tensors, meta,
                    versions_from_blobs)
    return {"shard": shard, "version": version, "step": step, "attempt": attempt, **one,
            "samples": samples, "loss": loss}


def _put_blob(ctx: Context, job_id: str, key: str, tensors: dict[str, torch.Tensor], meta: dict[str, Any],
              versions_from_blobs: bool) -> dict[str, Any]:
    # Compressed codecs' payloads (sorted indices, int8 codes, half floats) still shrink under zstd;
    # fp32 gradients barely do (~1.1x), so they skip it. Written as the tensors' own buffers, never joined
    # into one copy of the whole update.
    compress = meta["codec"].get("codec") != "none"
    parts = blobs.encode_parts(tensors, meta, compress=compress, signing_key=ctx.signing_key)
    size = blobs.size_of(parts)
    faults.point("shard.before_upload", ctx.redis, job_id)
    # Flushed only where versions are rebuilt from it; otherwise a blob a power loss tears fails its digest (or is
    # missing) and is recomputed.
    ctx.store.put(key, parts, durable=versions_from_blobs)
    if compress or versions_from_blobs:  # (an fp32 update is the model's size: held where replay is certain)
        ctx.hold_blob(key, parts)  # the next version's replay folds it from memory (workers/replay.py)
    ctx.jobs.add_bytes(job_id, up=size, down=ctx.take_unsent_down(job_id))  # the version's read, counted here
    # The envelope's digest: the reader checks it in its one pass over the bytes. (BLAKE3 from blob format 3; the
    # result's field keeps the name "sha256" it had, which results already queued carry.)
    return {"key": key, "sha256": blobs.digest_of(parts[0]), "bytes": size}
