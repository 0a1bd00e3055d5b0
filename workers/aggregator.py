"""The aggregator's work for a sync round: verify the set of shard blobs, average, step, checkpoint, commit.

Exactly once: the version bump (``JobStore.commit_version``) is the commit point; it records the
identities of the blobs consumed, and refuses when the job already moved on. Everything before it is
deterministic and idempotent (the checkpoint for N+1 is the same bytes however often it is written),
so a crash at any point followed by redelivery commits the same version once.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from pipeline import blobs
from pipeline.aggregate import Accumulator, UpdateRejected, lr_factor, select_round, sgd_step_
from pipeline.checkpoint import Checkpoint, checkpoint_parts, part_state
from pipeline.data import total_rounds
from pipeline.reasons import reason_code
from pipeline.recipe import Source, full_checkpoint_of
from pipeline.recipe import recipe as replay_recipe
from pipeline.spec import JobSpec
from storage import keys
from storage.jobstate import TERMINAL, JobState
from storage.leases import round_results
from storage.objectstore import ObjectNotFound
from workers import faults
from workers.commit import Commit, commit_next_version
from workers.context import Context
from workers.metrics import observe_rejected
from workers.updates import KeyRefused, Shapes, drop_under, fold_blob, load_update

log = logging.getLogger(__name__)


class RoundIncomplete(Exception):
    """Some shards' blobs are missing or bad; the round is retried after they are (re)computed."""

    def __init__(self, reasons: list[str], recompute: list[int]) -> None:
        super().__init__("; ".join(reasons))
        self.reasons = reasons
        self.recompute = recompute


def opt_hparams(spec: JobSpec, version: int, total: int) -> dict[str, Any]:
    """The optimizer's settings for the step from `version` to `version` + 1 of a job of `total` versions (the
    spec's lr_schedule; recipes record the lr used, so a rebuilt version never recomputes it)."""
    if spec.local_steps > 1:  # DiLoCo outer optimizer: Nesterov momentum on the mean pseudo-gradient
        return {"lr": spec.outer_lr, "momentum": spec.outer_momentum, "nesterov": True, "weight_decay": 0.0}
    lr = spec.lr * lr_factor(spec.lr_schedule, version, total, spec.lr_warmup_versions)
    return {"lr": lr, "momentum": spec.momentum, "nesterov": spec.nesterov, "weight_decay": spec.weight_decay}


def _find_blob(ctx: Context, job_id: str, version: int, shard: int, part: int | None = None) -> str | None:
    found = [(g.attempt, k) for k in ctx.store.list(keys.gradient_attempts(job_id, version, shard))
             if (g := keys.parse_gradient(k)) is not None and g.part == part]
    return max(found, default=(0, None))[1]  # the newest attempt, by number ("a10" sorts before "a2" as text)


class _Problems:
    """What kept shards out of a round: a reason per shard, and the shards to compute again; and the bytes
    the round's folds read (counted in the job once per round, not once per blob: one Redis round trip)."""

    def __init__(self) -> None:
        self.reasons: list[str] = []
        self.recompute: list[int] = []
        self.bytes_down = 0
        self.sources: list[Source] = []  # the blobs folded, in folding order

    def raise_if_any(self) -> None:
        if self.reasons:
            raise RoundIncomplete(self.reasons, self.recompute)


def _read_shard(ctx: Context, job_id: str, version: int, s: int, r: Any, shapes: Shapes, problems: _Problems,
                acc: Accumulator | None, part: int | None = None) -> str | None:
    """Fold shard `s`'s verified update for round `version` (from its result, or found in the store) into
    `acc`, or (acc None) only verify it, finiteness included; return its key, or None with the reason
    recorded. A bad blob is deleted (never applied) and its shard marked for recompute."""
    if part is not None and r is not None:  # a job aggregated in parts: this part's blob of the shard
        listed = r.get("parts")
        ok = isinstance(listed, list) and 0 <= part < len(listed) and isinstance(listed[part], dict)
        r = listed[part] if ok else None
    key = str(r["key"]) if r is not None and "key" in r else _find_blob(ctx, job_id, version, s, part)
    digest = str(r["sha256"]) if r is not None and "sha256" in r else None
    if key is None:
        problems.reasons.append(f"shard {s}: no result and no blob under version {version}")
        return None
    expect = {"job": job_id, "shard": s, "base_version": version, **({"part": part} if part is not None else {})}

    def read(key: str, digest: str | None) -> str:
        if acc is None:
            load_update(ctx, job_id, key, digest, shapes, expect, finite=True)
        else:
            size = fold_blob(ctx, job_id, key, digest, shapes, expect, acc)
            problems.bytes_down += size
            problems.sources.append((key, digest, size, s))
        return key

    try:
        try:
            return read(key, digest)
        except ObjectNotFound:
            # Rejected (and deleted) on an earlier try: the recomputed attempt takes its place. A retry may
            # still be given results naming the deleted attempt (a caller's, or read before the recompute).
            newer = _find_blob(ctx, job_id, version, s, part)
            if newer is None or newer == key:
                raise
            key = newer
            return read(key, None)
    except ObjectNotFound as e:
        problems.reasons.append(f"shard {s}: {e}")
        problems.recompute.append(s)
    except (blobs.BlobError, UpdateRejected) as e:
        problems.reasons.append(f"shard {s}: {e}")
        ctx.jobs.event(job_id, "rejected", shard=s, version=version, reason=str(e))
        observe_rejected(reason_code(e))
        if not isinstance(e, KeyRefused):
            ctx.store.delete(key)  # a corrupt blob is never applied; the shard is recomputed
        problems.recompute.append(s)
    return None


def fold_round(ctx: Context, job_id: str, spec: JobSpec, version: int, results: list[Any], shapes: Shapes,
               part: int | None = None, sources: list[Source] | None = None) -> Accumulator:
    """Every shard's verified update folded into one fp32 sum, by shard identity (never by count), as each
    blob is read (see ``fold_blob``). Finiteness is checked once, on the sum; when it fails, the round's
    blobs are read again to name the shard(s) at fault (the rare path). `sources`: filled with the blobs
    folded, in order (what a shard worker needs to fold the same sum: workers/replay.py)."""
    shards = list(range(spec.shards))
    # The results the round's shards recorded, unless the caller holds them (a process running the shards itself).
    by_shard, _missing = select_round(results or round_results(ctx.redis, job_id, version), shards)
    problems = _Problems()
    acc = Accumulator(shapes)
    used: dict[int, str] = {}
    for s in shards:
        r = by_shard.get(s)
        if r is not None and "rejected" in r:
            continue  # the shard worker refused its own update (NaN/Inf): weight 0 this round
        key = _read_shard(ctx, job_id, version, s, r, shapes, problems, acc, part)
        if key is not None:
            used[s] = key
    ctx.defer_down(job_id, problems.bytes_down)  # counted by the commit (or the part's record)
    problems.raise_if_any()  # before anything uses the sum: it may hold part of a blob that failed its digest
    if not acc.folded:
        raise UpdateRejected(f"every shard's update of round v{version} was rejected (NaN/Inf): diverged")
    if acc.nonfinite():
        for s, key in used.items():
            _read_shard(ctx, job_id, version, s, {"key": key}, shapes, problems, None)  # key given: part-free
        problems.raise_if_any()
        raise UpdateRejected(f"the sum of round v{version}'s updates overflows to Inf although each is finite",
                             code="nonfinite")
    if sources is not None:
        sources.extend(problems.sources)
    return acc


def aggregate_round(ctx: Context, job_id: str, version: int, results: list[Any], job: JobState | None = None
                    ) -> Commit:
    """Fold round `version`'s updates, step, write and commit version+1. `job`: its state as just read by
    the caller, if it has it (saves a read)."""
    t0 = time.perf_counter()
    job = job if job is not None else ctx.jobs.get(job_id)
    spec = JobSpec.model_validate(job.spec)
    if job.version > version or job.status in TERMINAL:
        # A duplicate (redelivered or early-fired) aggregation: this round is already committed.
        return Commit(False, job.version, {})
    ckey = keys.checkpoint(job_id, version)
    ckpt = ctx.checkpoint(ckey, job_id, with_opt=True, spec=job.spec)
    names = ctx.param_names(ckpt)
    t_read = time.perf_counter()
    sources: list[Source] = []
    acc = fold_round(ctx, job_id, spec, version, results, {n: tuple(ckpt.state[n].shape) for n in names},
                     sources=sources)
    faults.point("aggregator.after_read", ctx.redis, job_id)
    t_fold = time.perf_counter()

    # Version N's tensors become version N+1's, in place: the checkpoint leaves the cache first, so a failure
    # from here on leaves no half-stepped version behind (a retry reads N again from the store).
    ctx.forget_checkpoint(ckey)
    mean, samples, train_loss = acc.mean()
    identities = [u.identity for u in acc.folded]  # in shard order
    momentum = dict(ckpt.opt.get("momentum", {}))
    had_momentum = bool(momentum)
    hparams = opt_hparams(spec, version, job.total_rounds)
    sgd_step_({n: ckpt.state[n] for n in names}, mean, momentum, **hparams)
    del mean, acc
    # How a shard worker holding version N builds N+1 from these blobs ({} where that would not save bytes); for
    # a version between full checkpoints, the version itself (written in place of its checkpoint).
    recipe = replay_recipe(version + 1, sources, ckpt.state, hparams, momentum, base_had_momentum=had_momentum,
                           full=_full_of(spec, job, version + 1), always=spec.checkpoint_every_versions > 1)
    manifest = ctx.manifest(job.fields["manifest"])
    rounds = total_rounds(manifest.shard_sizes, spec.batch_size, spec.epochs, spec.local_steps)
    epoch = round((version + 1) * spec.local_steps / max(1, rounds * spec.local_steps / spec.epochs), 3)
    timings = {"load_s": round(t_read - t0, 4), "fold_s": round(t_fold - t_read, 4),
               "step_s": round(time.perf_counter() - t_fold, 4)}
    return commit_next_version(ctx, job, ckpt, ckpt.state, momentum, identities, mode="sync", started=t0,
                               extra_metrics={"train_loss": train_loss, "samples": samples, "epoch": epoch,
                                              "lr": hparams["lr"], **timings},
                               recipe=recipe)


def drop_spent_round(ctx: Context, job_id: str, spec: JobSpec, version: int) -> None:
    """Version `version` + 1 is committed: delete round `version` − 1's blobs (every shard, part and attempt).
    Round `version`'s stay one round more, for the shard workers that replay version `version` + 1 from them
    (workers/replay.py); no reader needs an older round's once both later versions are stored whole. A job with
    ``checkpoint_every_versions`` > 1 keeps every blob: its versions between full checkpoints are rebuilt from
    them (workers/rebuild.py). Kept, a round's blobs (a model's size per shard) grew the store without bound."""
    if spec.checkpoint_every_versions > 1 or version < 1:
        return
    drop_under(ctx, job_id, keys.gradients_of_round(job_id, version - 1))


def _full_of(spec: JobSpec, job: JobState, version: int) -> int | None:
    """None where `version` gets a full checkpoint (every ``checkpoint_every_versions``, and the job's last);
    otherwise the version of the full checkpoint it is rebuilt from."""
    every = spec.checkpoint_every_versions
    if every == 1 or version % every == 0 or version >= job.total_rounds:
        return None
    return full_checkpoint_of(version, every)


# ---------------------------------------------------------------- aggregation in parameter ranges


def part_ranges(ctx: Context, spec: JobSpec) -> list[list[str]]:
    """The job's parameter ranges (the shards split their blobs the same way, from the same sizes)."""
    return ctx.part_ranges(spec.model, spec.model_args, spec.aggregation_parts)


def _base_part(ctx: Context, job_id: str, version: int, part: int) -> Checkpoint:
    """Version `version`'s weights and momentum for range `part`: its own part object (a job's K is fixed, so
    every version after 0 is written in the same ranges); version 0 is one checkpoint, read whole."""
    if version == 0:
        return ctx.checkpoint(keys.checkpoint(job_id, 0), job_id, with_opt=True)
    return ctx.checkpoint(keys.checkpoint_part(job_id, version, part), job_id, with_opt=True)


def aggregate_part(ctx: Context, job_id: str, version: int, results: list[Any], part: int) -> Commit:
    """One of round `version`'s K part tasks: take a parameter range (``claim_range``), fold its blobs, step its
    parameters, write its part of version+1; the task that finds every part written commits the version (once:
    the commit is a compare-and-set)."""
    t0 = time.perf_counter()
    job = ctx.jobs.get(job_id)
    spec = JobSpec.model_validate(job.spec)
    if job.version > version or job.status in TERMINAL:
        return Commit(False, job.version, {})
    ranges = part_ranges(ctx, spec)
    if not 0 <= part < len(ranges):
        raise UpdateRejected(f"aggregation part {part} of job {job_id}: the job has {len(ranges)} parts")
    taken = claim_range(ctx, job_id, version, part, len(ranges))
    if taken is not None:
        _aggregate_one_part(ctx, job, spec, version, results, taken, ranges, t0)
    done = ctx.jobs.parts_done(job_id, version)
    if len(done) < len(ranges):
        return Commit(False, version, {"part": taken})
    return _commit_parts(ctx, job, spec, version, [done[str(p)] for p in range(len(ranges))], ranges, t0)


def claim_range(ctx: Context, job_id: str, version: int, part: int, n: int) -> int | None:
    """The parameter range this task aggregates: the K tasks of a round are not routed to processes, so a task
    takes a range when it starts, the range this process holds first (its own part of version `version`: no
    read, no rebuild), then the one it was sent for (`part`: processes holding nothing still spread over the
    ranges), then any other; each claimed once in Redis. When every range not yet written is claimed (a task sent
    again after its process died), it takes one of those: two processes may then write the same range, which is
    the same bytes. None when every range is written."""
    done = ctx.jobs.parts_done(job_id, version)
    held = [p for p in range(n) if ctx.holds_checkpoint(keys.checkpoint_part(job_id, version, p))]
    todo = [p for p in dict.fromkeys([*held, part, *range(n)]) if str(p) not in done]
    for p in todo:
        if ctx.jobs.claim_part(job_id, version, p, ctx.claimant):
            return p
    return todo[0] if todo else None


def _aggregate_one_part(ctx: Context, job: JobState, spec: JobSpec, version: int, results: list[Any], part: int,
                        ranges: list[list[str]], t0: float) -> None:
    job_id, names = job.job_id, ranges[part]
    held = version > 0 and ctx.holds_checkpoint(keys.checkpoint_part(job_id, version, part))
    base = _base_part(ctx, job_id, version, part)
    sources: list[Source] = []
    acc = fold_round(ctx, job_id, spec, version, results, {n: tuple(base.state[n].shape) for n in names}, part,
                     sources=sources)
    if down := ctx.take_unsent_down(job_id):  # a part does not commit: its reads are counted here
        ctx.jobs.add_bytes(job_id, down=down)
    t_fold = time.perf_counter()
    ctx.forget_checkpoint(keys.checkpoint_part(job_id, version, part))  # its tensors are stepped in place next
    ctx.forget_checkpoint(keys.checkpoint(job_id, version))
    mean, samples, train_loss = acc.mean()
    momentum = {n: t for n, t in base.opt.get("momentum", {}).items() if n in set(names)}
    had_momentum, hparams = bool(momentum), opt_hparams(spec, version, job.total_rounds)
    sgd_step_({n: base.state[n] for n in names}, mean, momentum, **hparams)
    state = part_state(base.state, ranges, part)  # (part 0 carries the buffers outside the parameter ranges)
    t_step = time.perf_counter()
    new = Checkpoint(base.model, base.model_args, version + 1, state, {"momentum": momentum} if momentum else {},
                     {"job": job_id, "part": part})
    # With checkpoint_every_versions: this range's recipe, the range itself between full checkpoints (its blobs
    # are this range's); the shard workers replay every version from the parts' recipes (the commit hands them on).
    recipe = {} if spec.checkpoint_every_versions == 1 else replay_recipe(
        version + 1, sources, state, hparams, momentum, base_had_momentum=had_momentum,
        full=_full_of(spec, job, version + 1), always=True, part=part)
    ctx.store_version(keys.checkpoint_part(job_id, version + 1, part), new, recipe)
    ctx.jobs.record_part(job_id, version, part, {
        "identities": [u.identity for u in acc.folded], "samples": samples, "train_loss": train_loss,
        "fold_s": round(t_fold - t0, 4), "step_s": round(t_step - t_fold, 4),
        "write_s": round(time.perf_counter() - t_step, 4), "held": held, **({"recipe": recipe} if recipe else {})})
    faults.point("aggregator.after_part", ctx.redis, job_id)


def _commit_parts(ctx: Context, job: JobState, spec: JobSpec, version: int, done: list[dict[str, Any]],
                  ranges: list[list[str]], t0: float) -> Commit:
    """Every part of version+1 is written: write its list of parts, then commit it with everything consumed."""
    job_id = job.job_id
    # The model and its arguments are the spec's (every checkpoint of the job is built from them): no read of
    # another process's part just to learn them.
    manifest = Checkpoint(spec.model, spec.model_args, version + 1, {}, {},
                          {"job": job_id, "parts": [keys.checkpoint_part(job_id, version + 1, p)
                                                    for p in range(len(ranges))]})
    ckey = keys.checkpoint(job_id, version + 1)
    ctx.store.put(ckey, checkpoint_parts(manifest, signing_key=ctx.signing_key))
    identities = sorted({i for d in done for i in d["identities"]})
    metrics = {"train_loss": done[0]["train_loss"], "samples": done[0]["samples"], "parts": len(ranges),
               "lr": opt_hparams(spec, version, job.total_rounds)["lr"],
               # the ranges whose process did not hold them from the round before (read or rebuilt from the store)
               "parts_read": sum(not d.get("held", True) for d in done),
               **{k: max(float(d[k]) for d in done) for k in ("fold_s", "step_s", "write_s")},
               "t": time.time(), "round_s": round(time.perf_counter() - t0, 4)}
    recipes = [d.get("recipe") for d in done]  # the shard workers' way to the new version without reading it
    recipe = {"version": version + 1, "parts": recipes} if all(recipes) else None
    after = ctx.jobs.commit_version(job_id, base_version=version, new_version=version + 1, checkpoint_key=ckey,
                                    identities=identities, metrics=metrics,
                                    fields=None if recipe is None else {"recipe": json.dumps(recipe)},
                                    event={"version": version + 1, "train_loss": metrics["train_loss"],
                                           "parts": len(ranges)})
    return Commit(after is not None, version + 1, metrics, after)
