"""Celery tasks: thin entry points. Each decodes its JSON arguments and calls a plain function.

Failure policy, in one place (``_guarded``): transient errors (store or Redis unreachable, a missing
or corrupt blob) are retried with exponential backoff up to ``task_max_retries``; then the job is
marked failed with the reason, and the last committed version stays readable. A message delivered
more than ``max_deliveries`` times (it keeps killing its worker) is a poison message: the job fails.

Liveness, in the same place: a task working on a job's slot (``storage/keys.py``) holds a lease while it runs
(renewed by the process's ``WorkerAgent``), released when it ends and held through a retry's countdown; the
monitor (``workers/liveness.py``) relaunches the slot when the lease is lost.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import redis
from celery import Task
from celery.exceptions import Retry
from celery.signals import worker_ready

from pipeline import blobs
from pipeline.spec import JobSpec
from storage import keys
from storage.jobstate import JobNotFound
from storage.objectstore import StoreError
from workers import aggregator, async_agg, liveness, publish, shard
from workers.app import (
    TASK_AGGREGATE,
    TASK_AGGREGATE_PART,
    TASK_APPLY_UPDATE,
    TASK_PREDICT,
    TASK_PUBLISH,
    TASK_TRAIN_SHARD,
    TASK_WATCHDOG,
    app,
)
from workers.context import Context, get_context
from workers.lifecycle import advance, start_watchdog, watchdog_sweep

log = logging.getLogger(__name__)

TRANSIENT = (StoreError, blobs.BlobError, aggregator.RoundIncomplete, async_agg.JobBusy, redis.ConnectionError,
             redis.TimeoutError, ConnectionError, TimeoutError)


def _backoff_s(ctx: Context, retries: int) -> float:
    s = ctx.settings
    return float(min(s.retry_backoff_max_s, s.retry_backoff_s * (2**retries)))


def _guarded(task: Task, job_id: str, what: str, fn: Callable[[Context], dict[str, Any]],
             on_retry: Callable[[Context, Exception], None] | None = None, *, slot: str | None = None
             ) -> dict[str, Any]:
    ctx = get_context()
    task_id = task.request.id
    if slot is None or not task_id:
        return _run_guarded(ctx, task, job_id, what, fn, on_retry)
    agent = liveness.agent_for(ctx, task.request.hostname)
    # The lease and the delivery count in one round trip (both on a round's critical path).
    delivered = agent.begin(job_id, task_id, slot, what, then=lambda pipe: _count_delivery(pipe, task))[0]
    held = False
    try:
        return _run_guarded(ctx, task, job_id, what, fn, on_retry, delivered=int(delivered))
    except Retry as e:
        eta = getattr(e, "when", None)
        agent.hold(job_id, task_id, float(eta) if isinstance(eta, (int, float)) else ctx.settings.retry_backoff_max_s)
        held = True
        raise
    finally:
        if not held:
            agent.end(job_id, task_id)


def _count_delivery(pipe: Any, task: Task) -> None:
    """Queue the count of this delivery of the task (the INCR's reply is the count)."""
    dkey = keys.deliveries(f"{task.request.id}:{task.request.retries}")
    pipe.incr(dkey)
    pipe.expire(dkey, 7 * 24 * 3600)


def _run_guarded(ctx: Context, task: Task, job_id: str, what: str, fn: Callable[[Context], dict[str, Any]],
                 on_retry: Callable[[Context, Exception], None] | None, *, delivered: int | None = None
                 ) -> dict[str, Any]:
    if delivered is None:  # no lease taken (no slot): the count takes its own round trip
        pipe = ctx.redis.pipeline(transaction=False)
        _count_delivery(pipe, task)
        delivered = int(pipe.execute()[0])
    if delivered > ctx.settings.max_deliveries:
        reason = f"{what}: delivered {delivered} times without finishing (a poison message that kills its worker?)"
        ctx.jobs.set_status(job_id, "failed", error=reason)
        return {"failed": reason}
    try:
        return fn(ctx)
    except TRANSIENT as e:
        retries = task.request.retries
        if retries >= ctx.settings.task_max_retries:
            reason = f"{what}: gave up after {retries} retries: {e}"
            log.error(reason)
            ctx.jobs.set_status(job_id, "failed", error=reason)
            return {"failed": reason}
        ctx.jobs.event(job_id, "retry", task=what, attempt=retries + 1, reason=str(e))
        if on_retry is not None:
            on_retry(ctx, e)
        # max_retries=None would mean Celery's default of 3 (not "unlimited"): pass ours, already checked above.
        raise task.retry(exc=e, countdown=_backoff_s(ctx, retries), max_retries=ctx.settings.task_max_retries) from None
    except JobNotFound:
        # Redis no longer knows the job (it lost its state, or the job was deleted): there is no job to fail.
        # Marking it failed here raced the liveness monitor, which rebuilds such a job from the store and
        # relaunches its work; a failed status written after that rebuild ended a job that was running again.
        log.warning("%s: the job is not in Redis (lost with its state, or deleted); task dropped", what)
        return {"ignored": "job not found"}
    except Exception as e:
        # A bug or a permanent defect: retrying cannot help. Fail the job now, with the reason, rather
        # than leave it waiting for a round that will never complete.
        reason = f"{what}: {type(e).__name__}: {e}"
        log.exception(reason)
        ctx.jobs.set_status(job_id, "failed", error=reason)
        raise


@app.task(name=TASK_TRAIN_SHARD, bind=True)
def train_shard_task(self: Task, job_id: str, shard_id: int, version: int, step: int, attempt: int = 0
                     ) -> dict[str, Any]:
    """Compute shard `shard_id`'s update on version `version`; upload it; return its key and numbers."""
    job_id, shard_id, version, step, attempt = str(job_id), int(shard_id), int(version), int(step), int(attempt)
    slot = keys.slot_shard(version, shard_id) if version >= 0 else keys.slot_step(shard_id, step)
    what = (f"shard {shard_id} of job {job_id} v{version}" if version >= 0
            else f"shard {shard_id} of job {job_id} step {step}")
    out = _guarded(self, job_id, what, lambda ctx: shard.train_shard(ctx, job_id, shard_id, version, step, attempt),
                   slot=slot)
    out["worker"] = self.request.hostname
    if "failed" not in out and "ignored" not in out:
        liveness.shard_finished(get_context(), job_id, shard_id, version, attempt, out)
    return out


@app.task(name=TASK_AGGREGATE, bind=True)
def aggregate_task(self: Task, results: list[Any], job_id: str, version: int) -> dict[str, Any]:
    """Apply round `version`'s updates (sent by the shard that completes the round, or by the monitor; the
    round's results are those its shards recorded): commit version+1, then start the next round."""
    job_id, version = str(job_id), int(version)
    results = results if isinstance(results, list) else []

    def run(ctx: Context) -> dict[str, Any]:
        job = ctx.jobs.get(job_id)
        spec = JobSpec.model_validate(job.spec)
        if spec.aggregation_parts > 1 and len(ranges := aggregator.part_ranges(ctx, spec)) > 1:
            ctx.dispatch.aggregate_parts(job_id, version, len(ranges), results)
            return {"job": job_id, "version": version, "parts": len(ranges)}
        outcome = aggregator.aggregate_round(ctx, job_id, version, results, job)
        advance(ctx, job_id, outcome.job)
        if outcome.committed:  # after the next round is launched: off its path
            aggregator.drop_spent_round(ctx, job_id, spec, version)
        return {"job": job_id, "version": outcome.version, "committed": outcome.committed,
                "accuracy": outcome.metrics.get("accuracy")}

    return _guarded(self, job_id, f"aggregation of job {job_id} v{version}", run,
                    _recompute_missing(self, job_id, version), slot=keys.slot_aggregate(version))


def _recompute_missing(task: Task, job_id: str, version: int) -> Callable[[Context, Exception], None]:
    """On an incomplete round, enqueue the shards to compute again (their new attempt replaces the bad blob)."""

    def recompute(ctx: Context, e: Exception) -> None:
        if isinstance(e, aggregator.RoundIncomplete):
            spec = JobSpec.model_validate(ctx.jobs.get(job_id).spec)
            for s in e.recompute:
                ctx.dispatch.shard(job_id, s, version, version * spec.local_steps, task.request.retries + 1,
                                   apply=False)

    return recompute


@app.task(name=TASK_AGGREGATE_PART, bind=True)
def aggregate_part_task(self: Task, results: list[Any], job_id: str, version: int, part: int) -> dict[str, Any]:
    """One of round `version`'s part tasks, sent for range `part`: it aggregates the range its process holds, if
    not yet written, else `part` or another range not yet taken (``aggregator.claim_range``); the task that
    completes the set commits and starts the next round."""
    job_id, version, part = str(job_id), int(version), int(part)
    results = results if isinstance(results, list) else []

    def run(ctx: Context) -> dict[str, Any]:
        outcome = aggregator.aggregate_part(ctx, job_id, version, results, part)
        if outcome.committed:
            advance(ctx, job_id)
            aggregator.drop_spent_round(ctx, job_id, JobSpec.model_validate(outcome.job.spec), version)
        return {"job": job_id, "version": outcome.version, "part": part, "range": outcome.metrics.get("part"),
                "committed": outcome.committed}

    return _guarded(self, job_id, f"aggregation part {part} of job {job_id} v{version}", run,
                    _recompute_missing(self, job_id, version), slot=keys.slot_aggregate(version))


@app.task(name=TASK_PUBLISH, bind=True)
def publish_task(self: Task, job_id: str, version: int) -> dict[str, Any]:
    """Evaluate committed `version` and register it, unless a newer version is committed (that one's task
    publishes instead); then finish the job if this was its last version or it reached its target."""
    job_id, version = str(job_id), int(version)

    def run(ctx: Context) -> dict[str, Any]:
        out = publish.evaluate_and_publish(ctx, job_id, version)
        advance(ctx, job_id)
        return out

    return _guarded(self, job_id, f"evaluation of job {job_id} v{version}", run, slot=keys.slot_publish(version))


@app.task(name=TASK_APPLY_UPDATE, bind=True)
def apply_update_task(self: Task, result: dict[str, Any], job_id: str) -> dict[str, Any]:
    """Async mode: apply one shard result on arrival (a link callback of the shard task)."""
    job_id = str(job_id)
    slot = None
    if isinstance(result, dict) and "shard" in result and "step" in result:
        slot = keys.slot_step(int(result["shard"]), int(result["step"]))
    return _guarded(self, job_id, f"async update of job {job_id}",
                    lambda ctx: async_agg.apply_update(ctx, job_id, result), slot=slot)


@app.task(name=TASK_PREDICT, bind=True, acks_late=False)
def predict_task(self: Task, model: str, alias: str, inputs: list[Any]) -> dict[str, Any]:
    """Batch inference from a queue, through the same loading and validation as the HTTP worker.

    Not acknowledged late: a prediction has no side effect worth redelivering after a worker death.
    """
    from workers.inference import PredictError, predict_batch

    ctx = get_context()
    reg = ctx.registry()
    rec = reg.resolve(str(model), str(alias))
    cache_key = f"served:{rec.model}:{rec.version}:{rec.sha256}"
    loaded = ctx.checkpoints.get(cache_key)
    if loaded is None:
        from pipeline.artifacts import load_artifact

        data = reg.fetch_artifact(rec.model, rec.version)
        loaded = load_artifact(data, rec.artifact_key, signing_key=ctx.signing_key)
        ctx.checkpoints.put(cache_key, loaded)
    try:
        out = predict_batch(loaded, inputs, max_batch=ctx.settings.max_predict_batch)
    except PredictError as e:
        return {"model": rec.model, "version": rec.version, "error": str(e), "status": e.status}
    return {"model": rec.model, "version": rec.version, **out}


@app.task(name=TASK_WATCHDOG, acks_late=False)
def watchdog_task() -> dict[str, Any]:
    """The watchdog as a beat task (also run by a thread in every worker: see start_watchdog)."""
    return {"relaunched": watchdog_sweep(get_context())}


@worker_ready.connect
def _liveness_on_worker_ready(sender: Any = None, **_: object) -> None:
    ctx = get_context()
    liveness.agent_for(ctx, getattr(sender, "hostname", None))  # the heartbeat, before the first task
    liveness.start_monitor(ctx)
    start_watchdog(ctx)  # the last resort
