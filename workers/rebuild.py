"""A version stored between full checkpoints, rebuilt exactly (``checkpoint_every_versions``).

A sync job with ``checkpoint_every_versions`` K > 1 writes weights and momentum buffers whole only every K versions
(and for the last); each version between is stored as its *recipe* (``pipeline/recipe.py``): the update blobs the
aggregator folded, in order, with their digests, the optimizer's settings, and a checksum (xxh3-64; CRC-32 in
recipes stored before) of the weights and buffers it stepped to. The blobs are kept (such a job never deletes the blobs
it applied) and written durably for such a job, so the full checkpoint the recipe names and the recipes after it
determine the version: each recipe's blobs are read and verified as the aggregator verifies them, folded and
stepped with its code (``fold_blob``, ``Accumulator``, ``sgd_step_``), and checked against the checksum. Nothing
half-built is ever returned: a missing or bad blob, or a checksum that differs, raises. A job aggregated in
parameter ranges stores a recipe per range (its blobs are that range's), and each range is rebuilt from that range
of the full checkpoint.

Every reader of a version gets it this way without knowing (``Context._read_checkpoint``): the aggregator after
a restart, a shard worker that holds no earlier version, the evaluation and registry task, ``aas resume``.
A worker that holds the version before replays one round instead (``workers/replay.py``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import torch

from pipeline import blobs
from pipeline.aggregate import Accumulator, sgd_step_
from pipeline.checkpoint import Checkpoint, param_names
from pipeline.recipe import decode_recipe, momentum_entries, state_crc
from storage import keys
from storage.services import Services
from workers.updates import fold_blob

log = logging.getLogger(__name__)


def read_recipe(svc: Services, job_id: str, version: int, part: int | None = None) -> dict[str, Any]:
    """Version `version`'s stored recipe (of parameter range `part`, for a job aggregated in parts), verified
    (signature, digest, version, part). ObjectNotFound when the version is not stored that way."""
    key = keys.version_recipe(job_id, version, part)
    return decode_recipe(svc.store.get(key), key, version=version, signing_key=svc.signing_key, part=part)


def fold_recipe(svc: Services, job_id: str, r: dict[str, Any], shapes: dict[str, tuple[int, ...]], *,
                held: Mapping[str, Any] | None = None, on_read: Callable[[int], None] | None = None
                ) -> dict[str, torch.Tensor]:
    """The sample-weighted mean of recipe `r`'s update blobs, folded in its order with the aggregator's code and
    each verified as the aggregator verifies it. A blob in `held` (key → the bytes this process wrote) is read
    from memory; `on_read` is called with the size of each blob read from the store."""
    acc = Accumulator(shapes)
    for bkey, digest, _, shard in r["updates"]:
        mine = None if held is None else held.get(bkey)
        expect = {"job": job_id, "shard": shard, "base_version": r["version"] - 1,
                  **({} if r["part"] is None else {"part": r["part"]})}
        n = fold_blob(svc, job_id, bkey, digest, shapes, expect, acc, held=mine)
        if mine is None and on_read is not None:
            on_read(n)
    return acc.mean()[0]


def step_checked(r: dict[str, Any], params: dict[str, torch.Tensor], state: Mapping[str, torch.Tensor],
                 mean: dict[str, torch.Tensor], momentum: dict[str, torch.Tensor]) -> bool:
    """Step `params` (tensors of `state`) and the `momentum` buffers in place with `r`'s optimizer settings; True
    when weights and buffers then match the checksum the aggregator recorded."""
    hp = r["hparams"]
    with torch.no_grad():
        sgd_step_(params, mean, momentum, **hp)
    return state_crc({**state, **momentum_entries(momentum if hp["momentum"] else {})}, r["check"]) == r["crc"]


def rebuild(svc: Services, job_id: str, base: Checkpoint, last: dict[str, Any]) -> tuple[Checkpoint, int]:
    """Version ``last["version"]`` from `base` (the full checkpoint ``last["full"]``, weights and optimizer state,
    owned by the caller: stepped in place) and the recipes from there to `last`. For a job aggregated in parts,
    `last` is one part's recipe and `base` that part of the full checkpoint. Returns the version and the bytes of
    blobs read (for the caller to count in the job)."""
    version, full, part = last["version"], last["full"], last["part"]
    if base.version != full:
        raise blobs.BlobError(keys.version_recipe(job_id, version, part), f"names full checkpoint v{full}, given v"
                                                                          f"{base.version}")
    chain = [read_recipe(svc, job_id, v, part) for v in range(full + 1, version)] + [last]
    state, momentum = base.state, dict(base.opt.get("momentum", {}))
    params = {n: state[n] for n in param_names(base) if n in state}  # (a part's state holds its range only)
    shapes = {n: tuple(t.shape) for n, t in params.items()}
    read: list[int] = []
    for r in chain:
        mean = fold_recipe(svc, job_id, r, shapes, on_read=read.append)
        if not r["hparams"]["momentum"] or not r["base_momentum"]:
            momentum = {}  # the step creates the buffers (or keeps none), as the aggregator's did
        if not step_checked(r, params, state, mean, momentum):
            raise blobs.BlobError(keys.version_recipe(job_id, r["version"], part), f"version {r['version']} rebuilt "
                                  f"from full checkpoint v{full} differs from the aggregator's (checksum): not used")
        del mean
    log.info("job %s v%d%s rebuilt from checkpoint v%d and %d recipe(s)", job_id, version,
             "" if part is None else f" part {part}", full, len(chain))
    return Checkpoint(base.model, base.model_args, version, state, {"momentum": momentum} if momentum else {},
                      {"job": job_id, "rebuilt_from": full, **({} if part is None else {"part": part})}), sum(read)
