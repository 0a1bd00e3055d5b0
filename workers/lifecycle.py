"""The job lifecycle: after each commit, finish the job or make sure its next work is queued; the
watchdog that relaunches the work of a job that stopped moving.

Work is enqueued through ``ctx.dispatch`` (a ``Dispatcher``): Celery in workers, a ``StubDispatcher``
in unit tests. Whether a job is finished is the pure rule in ``pipeline/stop_rule.py``.
"""

from __future__ import annotations

import logging
import threading
import time

from pipeline import async_plan
from pipeline.spec import JobSpec
from pipeline.stop_rule import Progress, is_finished
from storage import keys
from storage.jobstate import TERMINAL, JobState
from storage.leases import LeaseBook
from workers import affinity
from workers.context import Context
from workers.publish import evaluation_due
from workers.updates import drop_under

log = logging.getLogger(__name__)

LAUNCH_MARKER_TTL_S = 7 * 24 * 3600
NEWEST = -1  # a shard task's version argument: compute on the newest version when the task starts


def progress_of(ctx: Context, job: JobState, spec: JobSpec) -> Progress:
    is_async = spec.mode == "async"
    return Progress(mode=spec.mode, version=job.version, total_rounds=job.total_rounds,
                    test_accuracy=job.num("test_accuracy") if job.version > 0 else None,
                    target_accuracy=spec.target_accuracy,
                    accepted=int(job.fields.get("accepted", 0)), budget=int(job.fields.get("budget", 0)),
                    pending=len(ctx.jobs.pending(job.job_id)) if is_async else 0)


def advance(ctx: Context, job_id: str, job: JobState | None = None) -> str:
    """Move a job forward from its committed state: make sure its next work is queued, then the evaluation
    and publication of its newest version (on the ``publish`` queue, so the next round does not wait for
    them). A job ends once its last version has been evaluated (and registered). `job`: its state as the
    caller's commit left it (saves a read); read here otherwise."""
    committed_here = job is not None  # this process just committed job.version: nobody launched its round yet
    job = job if job is not None else ctx.jobs.get(job_id)
    if job.status in TERMINAL:
        return job.status
    spec = JobSpec.model_validate(job.spec)
    evaluated = int(job.fields.get("evaluated_version", 0))
    if is_finished(progress_of(ctx, job, spec)):
        if job.version == 0 or evaluated >= job.version:
            if ctx.jobs.set_status(job_id, "succeeded"):
                drop_finished(ctx, job_id, spec)
            return "succeeded"
        request_publish(ctx, job_id, job.version)
        return "running"
    if job.status == "queued":
        ctx.jobs.set_status(job_id, "running")
    if spec.mode == "async":
        issue_async_steps(ctx, job_id, spec)
    else:
        launch_round(ctx, job_id, spec, job.version, force=committed_here)
    if evaluated < job.version and evaluation_due(spec, job.version, job.total_rounds):
        request_publish(ctx, job_id, job.version)
    return "running"


def drop_finished(ctx: Context, job_id: str, spec: JobSpec) -> None:
    """A job has succeeded: delete what only its training read. Its update blobs (a sync job's last two rounds,
    and the orphans a process killed between a commit and its deletion left), unless its versions are rebuilt from
    them (``checkpoint_every_versions`` > 1); and its shards' codec states (``codec_state="store"``: a dense
    residual per shard and step). Its checkpoints, recipes and registered artifacts stay: every version is still
    reconstructable from the store. A failed job keeps everything, for ``aas resume`` and for a look at why."""
    if spec.checkpoint_every_versions == 1:
        drop_under(ctx, job_id, keys.gradients_prefix(job_id))
    drop_under(ctx, job_id, keys.codec_states_prefix(job_id))


def request_publish(ctx: Context, job_id: str, version: int, *, force: bool = False) -> bool:
    """Enqueue the evaluation and publication of committed `version`, once (unless forced)."""
    if version <= 0:
        return False
    if not ctx.redis.set(keys.job_publish_requested(job_id, version), 1, nx=not force, ex=LAUNCH_MARKER_TTL_S):
        return False
    ctx.dispatch.publish(job_id, version)
    return True


def launch_round(ctx: Context, job_id: str, spec: JobSpec, version: int, *, force: bool = False) -> bool:
    """Enqueue the round that computes on `version` (sync). Idempotent unless forced.

    The marker is set after the enqueue: a crash between the two enqueues the round twice, which is
    harmless (shard work is deterministic; the second aggregation finds the version committed).
    """
    marker = keys.job_launched(job_id, version)
    if not force and ctx.redis.exists(marker):
        return False
    queues = affinity.routes(ctx, job_id, spec)  # shards to the workers holding their codec state, if any
    ctx.dispatch.round(job_id, version, spec.shards, version * spec.local_steps, queues=queues)
    ctx.redis.set(marker, 1, ex=LAUNCH_MARKER_TTL_S)
    return True


def async_steps(ctx: Context, job: JobState, spec: JobSpec) -> list[tuple[int, int]]:
    """Async: the (shard, step) pairs that should be in flight now (``pipeline/async_plan.py``)."""
    budget = int(job.fields.get("budget", 0))
    if int(job.fields.get("accepted", 0)) >= budget:
        return []  # the budget is spent: what is pending gets published, nothing more is computed
    workers = len(affinity.live_queues(LeaseBook(ctx.redis, ctx.settings.lease_ttl_s).workers()))
    return async_plan.frontier(ctx.jobs.progress(job.job_id), ctx.jobs.ahead(job.job_id), shards=spec.shards,
                               local_steps=spec.local_steps, steps_per_shard=budget // spec.shards * spec.local_steps,
                               lookahead=not spec.shard_state, workers=workers)


def next_attempt(ctx: Context, job_id: str, shard: int) -> int:
    """A fresh attempt number for an async task of `shard`: its blob's key and identity are (shard, base
    version, attempt), and several steps of one shard may compute on the same version."""
    return int(ctx.redis.hincrby(keys.job_issued(job_id), f"{shard}:n", 1)) - 1


def issue_async_steps(ctx: Context, job_id: str, spec: JobSpec) -> None:
    """Async: keep the steps of the frontier in flight (each issued once, until dropped or relaunched)."""
    todo = async_steps(ctx, ctx.jobs.get(job_id), spec)
    issued = {k.decode(): v.decode() for k, v in ctx.redis.hgetall(keys.job_issued(job_id)).items()}
    want = {f"{s}@{step}" for s, step in todo}
    gone = [f for f in issued if "@" in f and f not in want]  # accepted since: no longer in flight
    if gone:
        ctx.redis.hdel(keys.job_issued(job_id), *gone)
    routes: dict[int, str] | None = None
    for shard, step in todo:
        if f"{shard}@{step}" in issued:
            continue
        attempt = next_attempt(ctx, job_id, shard)
        routes = affinity.routes(ctx, job_id, spec) if routes is None else routes  # once per call, if needed
        ctx.dispatch.shard(job_id, shard, NEWEST, step, attempt, apply=True, queue=routes.get(shard))
        ctx.redis.hset(keys.job_issued(job_id), f"{shard}@{step}", str(attempt))


def relaunch(ctx: Context, job_id: str) -> str:
    """Enqueue a job's current work again, whatever was enqueued before (watchdog, resume)."""
    job = ctx.jobs.get(job_id)
    if JobSpec.model_validate(job.spec).mode == "async":  # reissue every step in flight (attempt counters stay)
        in_flight = [f for f in ctx.redis.hkeys(keys.job_issued(job_id)) if b"@" in f]
        if in_flight:
            ctx.redis.hdel(keys.job_issued(job_id), *in_flight)
    else:
        ctx.redis.delete(keys.job_launched(job_id, job.version))  # launch the current round again
    ctx.redis.delete(keys.job_publish_requested(job_id, job.version))  # and its evaluation, if still due
    return advance(ctx, job_id)


# ---------------------------------------------------------------- watchdog


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
        relaunch(ctx, job_id)
        ctx.jobs.set_fields(job_id, progress_at=now)  # one relaunch per stall period, not one per sweep
        ctx.jobs.event(job_id, "watchdog", version=job.version, reason=f"no progress for {stall:.0f} s; relaunched")
        relaunched.append(job_id)
    return relaunched


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
