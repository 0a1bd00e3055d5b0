"""Version N+1 from the round's update blobs: a shard worker that holds version N need not download N+1.

A sync round's new weights are a pure function of version N and the blobs the aggregator folded:
``w_{N+1} = w_N − η·(Σ n_i·g_i / Σ n_i  [+ λ·w_N])``, computed by ``Accumulator`` and ``sgd_step_``. A shard
worker holds w_N already (the module it trained on, its weights restored) and wrote one of the blobs itself;
with compressed updates (int8, top-k, DiLoCo's int8 Δ) the *other* blobs are far fewer bytes than the
weights. So the aggregator commits, with each version, its *recipe*: the blobs it folded, in folding order,
each with its digest and size, the optimizer's settings, and a CRC-32 of the new state. A worker holding N
reads the blobs it does not hold (verified as the aggregator verifies them: key, signature, digest, identity,
shapes), folds them with the same code in the same order, steps in place, and compares the CRC: equal, it
trains on N+1 without reading the checkpoint; different (another CPU's arithmetic, a module whose weights a
task changed), it drops the module and reads the checkpoint as before. The design's "deltas between
checkpoints", with the update sent as the compressed blobs that already exist rather than a new fp32 delta.

Written only where it pays and is exact: a sync round aggregated in one part, an optimizer without momentum
(a worker holds no momentum buffers; the DiLoCo outer step as plain averaging, ``outer_momentum=0``, or SGD
with ``momentum=0`` as top-k with DGC requires), and blobs that, less the one a worker holds, are fewer bytes
than the weights. Replayed on the CPU only. Checkpoints are still written every version: resume, the
registry, inference and workers that hold no version read them as before.
"""

from __future__ import annotations

import json
import logging

import torch

from pipeline import blobs
from pipeline.aggregate import Accumulator, UpdateRejected, sgd_step_
from pipeline.recipe import state_crc
from storage import keys
from storage.objectstore import StoreError
from workers.aggregator import fold_blob
from workers.context import Context

log = logging.getLogger(__name__)


def advance(ctx: Context, job_id: str, version: int, raw: str | None, device: torch.device) -> bool:
    """Bring this process's module of version ``version − 1`` to `version` by its recipe (`raw`, the job's
    ``recipe`` field); True when the module of `version` is now cached (``ctx.model`` then reads nothing).
    False, with nothing changed or the module dropped, when it cannot or should not: the caller reads the
    checkpoint."""
    if not raw or not ctx.settings.replay_versions or device.type != "cpu":
        return False
    try:
        r = json.loads(raw)
        if int(r["version"]) != version:
            return False
        updates = [(str(k), None if d is None else str(d), int(n), int(s)) for k, d, n, s in r["updates"]]
        hparams = {"lr": float(r["hparams"]["lr"]), "nesterov": bool(r["hparams"]["nesterov"]),
                   "weight_decay": float(r["hparams"]["weight_decay"])}
        weights, crc = int(r["bytes"]), int(r["crc"])
    except (ValueError, KeyError, TypeError):
        log.warning("job %s v%d: unreadable recipe; reading the checkpoint", job_id, version)
        return False
    if ctx.cached_model(keys.checkpoint(job_id, version), device) is not None:
        return False
    module = ctx.cached_model(keys.checkpoint(job_id, version - 1), device)
    if module is None:
        return False
    held = {k: ctx.held_blobs.get(k) for k, _, _, _ in updates}
    if sum(n for k, _, n, _ in updates if held[k] is None) >= weights:
        return False
    params = {n: p.data for n, p in module.named_parameters() if p.requires_grad}
    shapes = {n: tuple(t.shape) for n, t in params.items()}
    acc = Accumulator(shapes)
    down = 0
    try:
        for key, digest, _, shard in updates:
            expect = {"job": job_id, "shard": shard, "base_version": version - 1}
            n = fold_blob(ctx, job_id, key, digest, shapes, expect, acc, held=held[key])
            down += 0 if held[key] is not None else n
        mean, _, _ = acc.mean()
    except (StoreError, blobs.BlobError, UpdateRejected) as e:  # the module is untouched: read the checkpoint
        log.warning("job %s v%d: cannot replay the round (%s); reading the checkpoint", job_id, version, e)
        return False
    finally:
        ctx.defer_down(job_id, down)  # counted with this task's upload, as a checkpoint read is
    with torch.no_grad():
        sgd_step_(params, mean, {}, lr=hparams["lr"], momentum=0.0, nesterov=hparams["nesterov"],
                  weight_decay=hparams["weight_decay"])
    del mean, acc
    if state_crc(module.state_dict()) != crc:
        ctx.drop_models()  # stepped to something else: never trained on
        log.warning("job %s v%d: the replayed weights differ from the aggregator's (CRC); reading the checkpoint",
                    job_id, version)
        return False
    ctx.keep_model(keys.checkpoint(job_id, version), device, module)
    return True
