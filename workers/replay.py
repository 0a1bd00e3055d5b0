"""Version N+1 from the round's update blobs: a shard worker that holds version N need not download N+1.

A sync round's new weights are a pure function of version N, the optimizer's momentum buffers and the blobs the
aggregator folded: ``Accumulator`` (the sample-weighted mean) then ``sgd_step_`` (SGD, momentum, Nesterov, weight
decay, exactly as torch.optim.SGD). A shard worker holds w_N already (the module it trained on, its weights
restored) and wrote one of the blobs itself; with compressed updates (int8, top-k, DiLoCo's int8 Δ) the *other*
blobs are far fewer bytes than the weights. So the aggregator commits, with each version, its *recipe*: the blobs
it folded, in folding order, each with its digest and size, the optimizer's settings, and a checksum (xxh3-64) of
the new weights and momentum buffers. A worker holding N reads the blobs it does not hold (verified as the
aggregator verifies them: key, signature, digest, identity, shapes), folds them with the same code in the same
order, steps in place, and compares the checksum: equal, it trains on N+1 without reading the checkpoint; different
(another CPU's arithmetic, a module whose weights a task changed), it drops the module and reads the checkpoint as
before. The design's "deltas between checkpoints", with the update sent as the compressed blobs that already exist
rather than a new fp32 delta.

With momentum (sync SGD's, DiLoCo's Nesterov outer step) the worker also holds the buffers: none before the
first step, then the ones its replay stepped; a worker that read a checkpoint instead (it joined late, sat a
round out, or its checksum differed) reads that version's buffers once beside it (``prime``), and replays from the
next version on. That is one more model's worth of memory in the worker.

Written only where it pays: a sync round aggregated in one part whose blobs, less the one a worker holds, are
fewer bytes than the weights — and for every version of a job with ``checkpoint_every_versions`` > 1, whose
versions between full checkpoints exist only as their recipes (workers/rebuild.py: how a process that holds no
version reads one). Such a job aggregated in parameter ranges (``aggregation_parts``) commits one recipe per
range, each for that range's blobs and checksum: the worker folds and steps each range in turn. Replayed on the CPU
only.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import torch

from pipeline import blobs
from pipeline.aggregate import UpdateRejected, partition
from pipeline.checkpoint import decode_optimizer, part_state
from pipeline.recipe import parse_round
from storage import keys
from storage.objectstore import StoreError
from workers.context import Context
from workers.metrics import observe_replay
from workers.rebuild import fold_recipe, step_checked

log = logging.getLogger(__name__)


def _recipes(ctx: Context, job_id: str, version: int, raw: str | None, device: torch.device
             ) -> list[dict[str, Any]] | None:
    """Version `version`'s recipe from the job's ``recipe`` field (one per parameter range for a job aggregated in
    parts), where this process may follow it: replay on, a CPU module, and the recipe that of `version` (not an
    older version's). None otherwise."""
    if not raw or not ctx.settings.replay_versions or device.type != "cpu" or version <= 0:
        return None
    try:
        rs = parse_round(json.loads(raw))
    except ValueError:
        log.warning("job %s v%d: unreadable recipe; reading the checkpoint", job_id, version)
        return None
    return rs if rs[0]["version"] == version else None


def _ranges(params: dict[str, torch.Tensor], rs: list[dict[str, Any]]) -> list[list[str]]:
    """The parameter ranges the recipes `rs` are of: every parameter for one recipe of a job aggregated in one
    part, else the job's ranges (split as the shard workers split their blobs)."""
    if rs[0]["part"] is None:
        return [list(params)]
    return partition([(n, t.numel()) for n, t in params.items()], len(rs))


def advance(ctx: Context, job_id: str, version: int, raw: str | None, device: torch.device) -> bool:
    """Bring this process's module of version ``version − 1`` to `version` by its recipe (`raw`, the job's
    ``recipe`` field); True when the module of `version` is now cached (``ctx.model`` then reads nothing).
    False, with nothing changed or the module dropped, when it cannot or should not: the caller reads the
    checkpoint."""
    rs = _recipes(ctx, job_id, version, raw, device)
    key, base = keys.checkpoint(job_id, version), keys.checkpoint(job_id, version - 1)
    if rs is None or ctx.cached_model(key, device) is not None or ctx.holds_checkpoint(key):
        return False  # another version's recipe; built already, or from memory (a process that aggregates too)
    module = ctx.cached_model(base, device)
    hp, r = rs[0]["hparams"], rs[0]
    # The optimizer's momentum buffers of the base version: none before the first step, else the ones this
    # process holds for it (from its previous replay, or read beside a checkpoint: ``hold_momentum``).
    buffers = ({} if not r["base_momentum"] else ctx.held_momentum(base)) if hp["momentum"] else {}
    if module is None or buffers is None:
        return False
    held = {k: ctx.held_blobs.get(k) for r in rs for k, _, _, _ in r["updates"]}
    if r["full"] is None and not r["always"] and sum(n for k, _, n, _ in r["updates"] if held[k] is None) >= r["bytes"]:
        return False  # (a version without a checkpoint of its own is replayed whatever its bytes: workers/rebuild.py)
    params = {n: p.data for n, p in module.named_parameters() if p.requires_grad}
    ranges = _ranges(params, rs)
    try:
        # Counted with this task's upload, as a checkpoint read is. Each range's blobs fold into that range's mean.
        means = [fold_recipe(ctx, job_id, r, {n: tuple(params[n].shape) for n in names}, held=held,
                             on_read=lambda n: ctx.defer_down(job_id, n)) for r, names in zip(rs, ranges, strict=True)]
    except Exception as e:  # noqa: BLE001 - nothing was changed, and the checkpoint is still there: read it
        expected = isinstance(e, (StoreError, blobs.BlobError, UpdateRejected, ValueError))  # a blob missing or bad
        log.warning("job %s v%d: cannot replay the round (%s); reading the checkpoint", job_id, version, e,
                    exc_info=not expected)
        observe_replay("unreadable")
        return False
    ctx.forget_momentum()  # stepped in place next: held for the new version only if it checks out
    state = module.state_dict()  # (its tensors are params')
    same = True
    for p, (r, names, mean) in enumerate(zip(rs, ranges, means, strict=True)):
        mine = {n: buffers[n] for n in names if n in buffers}  # this range's buffers (the step creates new ones)
        same = same and step_checked(r, {n: params[n] for n in names}, part_state(state, ranges, p), mean, mine)
        buffers.update(mine)
    if not same:
        ctx.drop_models()  # stepped to something else: never trained on
        log.warning("job %s v%d: the replayed weights differ from the aggregator's (checksum); reading the checkpoint",
                    job_id, version)
        observe_replay("mismatch")
        return False
    ctx.keep_model(key, device, module)
    if hp["momentum"]:
        ctx.hold_momentum(key, buffers)
    observe_replay("replayed")
    return True


def read_momentum(ctx: Context, job_id: str, ckey: str, version: int) -> dict[str, torch.Tensor]:
    """The momentum buffers stored beside checkpoint `ckey` (its optimizer state), counted as read for the job."""
    data = ctx.store.get(keys.optimizer_state(ckey))
    momentum = decode_optimizer(data, ckey, version=version, signing_key=ctx.signing_key).get("momentum", {})
    ctx.defer_down(job_id, len(data))
    return momentum


def prime(ctx: Context, job_id: str, version: int, raw: str | None, device: torch.device) -> None:
    """After this process read checkpoint `version` rather than replaying it, read the momentum buffers stored
    beside it (beside each of its parts, for a job aggregated in parts) too where the job's recipes need them,
    so the next versions replay (one read of the buffers instead of one of the weights per version)."""
    rs = _recipes(ctx, job_id, version, raw, device)
    key = keys.checkpoint(job_id, version)
    if rs is None or not rs[0]["hparams"]["momentum"] or ctx.held_momentum(key) is not None:
        return
    if ctx.holds_checkpoint(key):
        return
    stored = [key] if rs[0]["part"] is None else [keys.checkpoint_part(job_id, version, p) for p in range(len(rs))]
    momentum: dict[str, torch.Tensor] = {}
    try:
        for ckey in stored:
            momentum.update(read_momentum(ctx, job_id, ckey, version))
    except (StoreError, blobs.BlobError) as e:
        log.warning("job %s v%d: cannot read the momentum buffers (%s); the next versions are read whole",
                    job_id, version, e)
        return
    ctx.hold_momentum(key, momentum)
