"""A shard's state between steps: top-k error feedback (residual, and the velocity under momentum correction)
and, for local steps with a stateful inner optimizer (AdamW, ``inner_state="keep"``), that optimizer's state.

The state after the task at data step s is what the shard's next task (at step s + H) starts from. It is kept
in the worker process (``Context.residuals``) and, with ``codec_state="store"``, written beside the gradient
blob under ``keys.codec_state(job, shard, s)`` — so a shard that moves to another worker process continues
from the same state, and the run's weights do not depend on which worker ran which task.

Shards mostly do not move (``workers/affinity.py``, on unless AAS_SHARD_AFFINITY=false): the worker that kept a
shard's state records it, and the shard's next task goes to that worker's own queue while its heartbeat lives;
a dead worker's shards, relaunches, and a worker's share beyond ceil(shards / workers) go to the shared queue,
where this module's fallbacks below apply. Each task counts in its job whether it found the state of exactly its
previous step in its process (``state_local``) or not (``state_moved``). Measured (docs/benchmarks.md, issue 14):
``topk+q4-dgc-3%`` at H=8 on digits (24 epochs, 2 shards, 2 workers; seeds 0 / 1): with affinity 0 of 136 tasks
moved and the accuracy equals the store mode's (+0.56 / −0.56 points vs fp32 sync, ~600× fewer bytes, no state
bytes); without it 40 / 52 of 136 moved and it lost 1.1 / 1.4 points.

Exactness (``codec_state="store"``): the task at step s reads the state its shard wrote at s − H (never "the
latest"), so a redelivered task reads the same state and writes the same bytes. The process cache is used only
when it holds exactly step s − H. A missing state (step 0, or the shard's previous update was rejected) starts
from zero.

No lost mass (``codec_state="process"``, the default): a worker that last ran the shard at an older step still
holds that step's residual, which nobody has sent since (the shard's other workers carried their own), so the
task continues from it rather than from zero: whatever was not sent is delayed, never dropped. Which worker ran
which step then changes the weights (as a lost residual did); the store mode is the exact one. Measured with an
in-process replay of the sync pipeline on digits (24 epochs, topk+q4 at 1%, shards swapping between two workers
half the time; seeds 0 / 1): exact state 97.8 / 98.1%, zero on a move 95.8 / 97.8%, the held residual 97.8 / 97.2%.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from pipeline import blobs
from pipeline.codecs import Encoded
from storage import keys
from storage.objectstore import ObjectNotFound
from workers.context import Context

KIND = "codec-state"


@dataclass(frozen=True)
class CodecState:
    step: int
    residual: dict[str, Tensor] | None
    velocity: dict[str, Tensor] | None
    inner: dict[str, Tensor] | None = None  # the inner optimizer's ("<param>.exp_avg", ...: pipeline/training.py)


def held(ctx: Context, job_id: str, shard: int, prev_step: int) -> bool:
    """Whether this process holds the shard's state after exactly ``prev_step`` (its previous task ran here)."""
    hit = ctx.residuals.get((job_id, shard))
    return isinstance(hit, CodecState) and hit.step == prev_step


def load(ctx: Context, job_id: str, shard: int, prev_step: int, mode: str) -> CodecState:
    """The state the shard's task at step ``prev_step`` left (empty when there is none)."""
    empty = CodecState(prev_step, None, None)
    if prev_step < 0:
        return empty
    hit = ctx.residuals.get((job_id, shard))
    if isinstance(hit, CodecState) and hit.step == prev_step:
        return hit
    if mode != "store":  # an older step's residual is mass not sent yet (never a newer one: that would resend)
        return hit if isinstance(hit, CodecState) and hit.step < prev_step else empty
    key = keys.codec_state(job_id, shard, prev_step)
    try:
        data = ctx.store.get(key)
    except ObjectNotFound:
        return empty
    ctx.jobs.add_bytes(job_id, state=len(data))
    blob = blobs.decode(data, key, signing_key=ctx.signing_key)
    m = blob.meta
    if (m.get("kind"), m.get("job"), m.get("shard"), m.get("step")) != (KIND, job_id, shard, prev_step):
        raise blobs.BlobError(key, f"not the codec state of job {job_id} shard {shard} step {prev_step} "
                                   f"(kind {m.get('kind')!r}, job {m.get('job')!r}, shard {m.get('shard')!r}, "
                                   f"step {m.get('step')!r})")
    residual = {k[2:]: t for k, t in blob.tensors.items() if k.startswith("r.")}
    velocity = {k[2:]: t for k, t in blob.tensors.items() if k.startswith("u.")}
    inner = {k[2:]: t for k, t in blob.tensors.items() if k.startswith("o.")}
    if len(residual) + len(velocity) + len(inner) != len(blob.tensors):
        raise blobs.BlobError(key, "codec state holds tensors that are neither residual (r.), velocity (u.) nor "
                                   "inner optimizer state (o.)")
    return CodecState(prev_step, residual or None, velocity or None, inner or None)


def save(ctx: Context, job_id: str, shard: int, step: int, enc: Encoded, mode: str,
         inner: dict[str, Tensor] | None = None) -> bool:
    """Keep the state ``enc`` (and the inner optimizer's ``inner``) leaves after the task at ``step``; write it to
    the store in "store" mode; whether there was any. Deterministic bytes: a redelivered task overwrites the
    object with what it already held."""
    if enc.residual is None and not inner:
        return False
    state = CodecState(step, enc.residual, enc.velocity, inner or None)
    hit = ctx.residuals.get((job_id, shard))
    if not isinstance(hit, CodecState) or hit.step <= step:  # a redelivered older task leaves the newer one
        ctx.residuals[(job_id, shard)] = state
    if mode != "store":
        return True
    tensors = {f"r.{k}": t.detach().cpu().contiguous() for k, t in (enc.residual or {}).items()}
    tensors |= {f"u.{k}": t.detach().cpu().contiguous() for k, t in (enc.velocity or {}).items()}
    tensors |= {f"o.{k}": t.detach().cpu().contiguous() for k, t in (inner or {}).items()}
    meta = {"kind": KIND, "job": job_id, "shard": shard, "step": step}
    data = blobs.encode(tensors, meta, compress=True, signing_key=ctx.signing_key)
    ctx.store.put(keys.codec_state(job_id, shard, step), data)
    ctx.jobs.add_bytes(job_id, state=len(data))
    return True
