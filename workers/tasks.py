"""Celery tasks: thin entry points. Each decodes its JSON arguments and calls a plain function.

Failure policy, in one place (``_guarded``): transient errors (store or Redis unreachable, a missing
or corrupt blob) are retried with exponential backoff up to ``task_max_retries``; then the job is
marked failed with the reason, and the last committed version stays readable. A message delivered
more than ``max_deliveries`` times (it keeps killing its worker) is a poison message: the job fails.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import redis
from celery import Task, chord, group
from celery.signals import worker_ready

from pipeline import blobs
from pipeline.spec import JobSpec
from storage import keys
from storage.jobstate import TERMINAL
from storage.objectstore import StoreError
from workers import aggregator, async_agg, shard
from workers.app import app, app_for
from workers.context import Context, get_context
from workers.publish import publish_version

log = logging.getLogger(__name__)

TRANSIENT = (StoreError, blobs.BlobError, aggregator.RoundIncomplete, async_agg.JobBusy, redis.ConnectionError,
             redis.TimeoutError, ConnectionError, TimeoutError)
LAUNCH_MARKER_TTL_S = 7 * 24 * 3600


def _backoff_s(ctx: Context, retries: int) -> float:
    s = ctx.settings
    return float(min(s.retry_backoff_max_s, s.retry_backoff_s * (2**retries)))


def _guarded(task: Task, job_id: str, what: str, fn: Callable[[Context], dict[str, Any]],
             on_retry: Callable[[Context, Exception], None] | None = None) -> dict[str, Any]:
    ctx = get_context()
    dkey = keys.deliveries(f"{task.request.id}:{task.request.retries}")
    n = int(ctx.redis.incr(dkey))
    ctx.redis.expire(dkey, 7 * 24 * 3600)
    if n > ctx.settings.max_deliveries:
        reason = f"{what}: delivered {n} times without finishing (a poison message that kills its worker?)"
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
    except Exception as e:
        # A bug or a permanent defect: retrying cannot help. Fail the job now, with the reason, rather
        # than leave it waiting for a round that will never complete.
        reason = f"{what}: {type(e).__name__}: {e}"
        log.exception(reason)
        ctx.jobs.set_status(job_id, "failed", error=reason)
        raise


@app.task(name="aas.train_shard", bind=True)
def train_shard_task(self: Task, job_id: str, shard_id: int, version: int, step: int, attempt: int = 0
                     ) -> dict[str, Any]:
    """Compute shard `shard_id`'s update on version `version`; upload it; return its key and numbers."""
    job_id, shard_id, version, step, attempt = str(job_id), int(shard_id), int(version), int(step), int(attempt)
    out = _guarded(self, job_id, f"shard {shard_id} of job {job_id} v{version}",
                   lambda ctx: shard.train_shard(ctx, job_id, shard_id, version, step, attempt))
    out["worker"] = self.request.hostname
    return out


@app.task(name="aas.aggregate", bind=True)
def aggregate_task(self: Task, results: list[Any], job_id: str, version: int) -> dict[str, Any]:
    """Apply round `version`'s updates (a chord body): commit version+1, then start the next round."""
    job_id, version = str(job_id), int(version)
    results = results if isinstance(results, list) else []

    def run(ctx: Context) -> dict[str, Any]:
        outcome = aggregator.aggregate_round(ctx, job_id, version, results)
        advance(ctx, job_id)
        return {"job": job_id, "version": outcome.version, "committed": outcome.committed,
                "accuracy": outcome.metrics.get("accuracy")}

    def recompute(ctx: Context, e: Exception) -> None:
        if isinstance(e, aggregator.RoundIncomplete):
            spec = JobSpec.model_validate(ctx.jobs.get(job_id).spec)
            for s in e.recompute:
                train_shard_task.apply_async(
                    (job_id, s, version, version * spec.local_steps, self.request.retries + 1))

    return _guarded(self, job_id, f"aggregation of job {job_id} v{version}", run, recompute)


@app.task(name="aas.apply_update", bind=True)
def apply_update_task(self: Task, result: dict[str, Any], job_id: str) -> dict[str, Any]:
    """Async mode: apply one shard result on arrival (a link callback of the shard task)."""
    job_id = str(job_id)
    return _guarded(self, job_id, f"async update of job {job_id}",
                    lambda ctx: async_agg.apply_update(ctx, job_id, result))


def launch_round(ctx: Context, job_id: str, spec: JobSpec, version: int, *, force: bool = False) -> bool:
    """Enqueue the chord for the round that computes on `version`. Idempotent unless forced.

    The marker is set after the enqueue: a crash between the two enqueues the round twice, which is
    harmless (shard work is deterministic; the second aggregation finds the version committed).
    """
    marker = keys.job_launched(job_id, version)
    if not force and ctx.redis.exists(marker):
        return False
    step = version * spec.local_steps
    capp = app_for(ctx.settings)
    header = group(capp.signature("aas.train_shard", args=(job_id, s, version, step, 0)) for s in range(spec.shards))
    chord(header, app=capp)(capp.signature("aas.aggregate", args=(job_id, version)))
    ctx.redis.set(marker, 1, ex=LAUNCH_MARKER_TTL_S)
    return True


def advance(ctx: Context, job_id: str) -> str:
    """Move a job forward from its committed state: finish it, or make sure its next round is queued."""
    job = ctx.jobs.get(job_id)
    if job.status in TERMINAL:
        return job.status
    publish_version(ctx, job)
    spec = JobSpec.model_validate(job.spec)
    if spec.mode == "async":
        return async_agg.advance_async(ctx, job_id)
    target = spec.target_accuracy
    if job.version >= job.total_rounds or (target is not None and job.num("test_accuracy") >= target):
        ctx.jobs.set_status(job_id, "succeeded")
        return "succeeded"
    if job.status == "queued":
        ctx.jobs.set_status(job_id, "running")
    launch_round(ctx, job_id, spec, job.version)
    return "running"


@app.task(name="aas.predict", bind=True, acks_late=False)
def predict_task(self: Task, model: str, alias: str, inputs: list[Any]) -> dict[str, Any]:
    """Batch inference from a queue, through the same loading and validation as the HTTP worker.

    Not acknowledged late: a prediction has no side effect worth redelivering after a worker death.
    """
    from workers.inference import PredictError, predict_batch
    from workers.publish import registry_for

    ctx = get_context()
    reg = registry_for(ctx)
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


def stall_after_s(ctx: Context) -> float:
    s = ctx.settings
    return float(s.watchdog_stall_s or (s.visibility_timeout_s + s.task_time_limit_s))


def watchdog_sweep(ctx: Context, *, now: float | None = None) -> list[str]:
    """Re-enqueue the work of every running job that has made no progress for `stall_after_s`.

    Returns the ids of the jobs it relaunched. Duplicate work is harmless by design: sync shard work is
    deterministic and the commit is guarded; async results are accepted only for the expected step.
    """
    now = time.time() if now is None else now
    stall = stall_after_s(ctx)
    relaunched = []
    for job_id in ctx.jobs.list(limit=1000):
        try:
            job = ctx.jobs.get(job_id)
        except Exception:  # noqa: BLE001 - a job deleted meanwhile
            continue
        if job.status != "running" or now - job.num("progress_at", now) < stall:
            continue
        spec = JobSpec.model_validate(job.spec)
        if spec.mode == "async":
            ctx.redis.delete(keys.job_issued(job_id))
            async_agg.advance_async(ctx, job_id)
        else:
            launch_round(ctx, job_id, spec, job.version, force=True)
        ctx.jobs.set_fields(job_id, progress_at=now)  # one relaunch per stall period, not one per sweep
        ctx.jobs.event(job_id, "watchdog", version=job.version, reason=f"no progress for {stall:.0f} s; relaunched")
        relaunched.append(job_id)
    return relaunched


@app.task(name="aas.watchdog", acks_late=False)
def watchdog_task() -> dict[str, Any]:
    """The watchdog as a beat task (also run by a thread in every worker: see start_watchdog)."""
    return {"relaunched": watchdog_sweep(get_context())}


def start_watchdog(ctx: Context) -> threading.Thread | None:
    """Sweep every `watchdog_interval_s` from this process; a Redis lock lets one process sweep at a time."""
    interval = ctx.settings.watchdog_interval_s
    if interval <= 0:
        return None

    def loop() -> None:
        while True:
            time.sleep(interval)
            try:
                lock = ctx.redis.lock(keys.watchdog_lock(), timeout=max(5.0, interval), blocking_timeout=0)
                if lock.acquire(blocking=False):
                    watchdog_sweep(ctx)  # the lock expires by itself: at most one sweep per interval
            except Exception:  # noqa: BLE001 - Redis down: try again next interval
                log.warning("watchdog sweep failed", exc_info=True)

    t = threading.Thread(target=loop, name="aas-watchdog", daemon=True)
    t.start()
    return t


@worker_ready.connect
def _watchdog_on_worker_ready(**_: object) -> None:
    start_watchdog(get_context())
