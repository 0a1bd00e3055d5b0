"""Beat: the RedBeat configuration, the schedules from settings, and the ``aas.retrain`` task it fires.

Run one or more beats (RedBeat's Redis lock lets exactly one fire; another takes over within
``AAS_BEAT_LOCK_TIMEOUT_S`` of the holder's death) and a worker for the ``beat`` queue::

    celery -A workers.beat beat -S redbeat.RedBeatScheduler --max-interval 5
    celery -A workers.beat worker -Q beat --pool=solo -E

A firing runs ``run_retrain`` once: it lists the schedule's dataset prefix, and either records
"skipped: no new data" or submits a fine-tune job and marks the objects it handed over as seen.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from typing import Any

import redis
from celery import Celery, Task

from pipeline.schedules import Schedule, parse_schedule, retrain_spec, schedules_from_settings
from pipeline.settings import Settings, get_settings
from storage import keys
from storage.jobstate import JobStore
from storage.objectstore import ObjectStore, StoreError
from workers.app import QUEUE_BEAT, TASK_RETRAIN, app
from workers.schedules import beat_app_for, configure_beat, entry_fields

__all__ = ["QUEUE_BEAT", "app", "beat_app_for", "configure_beat", "retrain_task", "run_retrain"]

log = logging.getLogger(__name__)

RUNS_MAXLEN = 1000  # firings kept per schedule in its runs stream
FIRING_MARKER_TTL_S = 7 * 24 * 3600
RETRAIN_LOCK_S = 600  # one retrain of a schedule at a time; generous: staging a job writes its data set
NOTE_MAX_KEYS = 1000  # new object keys copied into the job's fields


def _install_from_settings(capp: Celery, settings: Settings) -> None:
    """Schedules from AAS_SCHEDULES_JSON become beat's static entries (RedBeat stores them at beat start).

    A schedule that does not validate raises ScheduleError here, so a misconfigured beat fails at start.
    """
    capp.conf.beat_schedule = {s.name: entry_fields(s) for s in schedules_from_settings(settings)}


configure_beat(app, get_settings())
_install_from_settings(app, get_settings())


def _record(r: redis.Redis, sched: Schedule, outcome: str, reason: str, **fields: Any) -> dict[str, Any]:
    body = {"outcome": outcome, "reason": reason, "t": f"{time.time():.3f}",
            **{k: str(v) for k, v in fields.items() if v is not None}}
    r.xadd(keys.schedule_runs(sched.name), body, maxlen=RUNS_MAXLEN, approximate=True)
    log.info("schedule %s: %s: %s", sched.name, outcome, reason)
    return {"schedule": sched.name, **body}


def run_retrain(sched: Schedule, *, r: redis.Redis, store: ObjectStore, jobs: JobStore,
                submit: Callable[[dict[str, Any]], str], alias_version: Callable[[str, str], int | None],
                firing_id: str) -> dict[str, Any]:
    """One firing: count it; skip when there is no new data; otherwise submit a fine-tune job.

    Objects are marked seen only after the job is submitted: a crash in between leaves them for the
    next firing (at worst a second job on the same data, never data silently dropped). A redelivered
    firing (same `firing_id`) does nothing.
    """
    if not r.set(keys.schedule_firing(sched.name, firing_id), 1, nx=True, ex=FIRING_MARKER_TTL_S):
        return {"schedule": sched.name, "outcome": "duplicate", "reason": f"firing {firing_id} already ran"}
    r.incr(keys.schedule_fired(sched.name))
    lock = r.lock(keys.schedule_lock(sched.name), timeout=RETRAIN_LOCK_S, blocking_timeout=0)
    if not lock.acquire(blocking=False):
        return _record(r, sched, "skipped", "a previous retrain of this schedule is still running")
    try:
        try:
            listed = sorted(k for k in store.list(sched.dataset_prefix) if not k.endswith("/"))
        except StoreError as e:  # recorded; the next firing looks again
            return _record(r, sched, "failed", f"cannot list {sched.dataset_prefix}: {e}")
        seen_key = keys.schedule_seen(sched.name)
        flags = r.smismember(seen_key, listed) if listed else []
        new = [k for k, was_seen in zip(listed, flags, strict=True) if not was_seen]
        if not new:
            return _record(r, sched, "skipped", "no new data", prefix=sched.dataset_prefix)
        from_version = alias_version(sched.model, sched.alias)
        try:
            job_id = submit(retrain_spec(sched, new, from_version))
        except Exception as e:  # noqa: BLE001 - recorded; the objects stay unseen for the next firing
            return _record(r, sched, "failed", f"submit failed: {type(e).__name__}: {e}", new_objects=len(new))
        # The note that ties the job to its schedule, its starting point and its new data. Training
        # from the alias's weights on exactly these objects is the aggregator's/stager's side.
        jobs.set_fields(job_id, retrain_schedule=sched.name, retrain_from=f"{sched.model}@{sched.alias}",
                        retrain_from_version="" if from_version is None else from_version,
                        retrain_new_objects=len(new), retrain_data=json.dumps(new[:NOTE_MAX_KEYS]))
        start = f"v{from_version}" if from_version is not None else "scratch (alias not set)"
        jobs.event(job_id, "note", text=f"retrain by schedule {sched.name}: {len(new)} new objects under "
                                        f"{sched.dataset_prefix}; starts from {sched.model}@{sched.alias} {start}")
        for i in range(0, len(new), 1000):
            r.sadd(seen_key, *new[i:i + 1000])
        return _record(r, sched, "submitted", f"{len(new)} new objects", job=job_id, new_objects=len(new),
                       from_version=from_version)
    finally:
        try:
            lock.release()
        except redis.exceptions.LockError:
            pass  # expired while staging: the next firing simply runs


@app.task(name=TASK_RETRAIN, bind=True)
def retrain_task(self: Task, schedule: dict[str, Any]) -> dict[str, Any]:
    """A beat firing of `schedule` (the whole schedule rides along as JSON, readable in Flower)."""
    sched = parse_schedule(schedule)
    from storage.registry import RegistryError
    from workers.context import get_context
    from workers.staging import submit_job

    ctx = get_context()

    def alias_version(model: str, alias: str) -> int | None:
        try:
            return ctx.registry().resolve(model, alias).version
        except RegistryError:
            return None

    return run_retrain(sched, r=ctx.redis, store=ctx.store, jobs=ctx.jobs, submit=lambda spec: submit_job(ctx, spec),
                       alias_version=alias_version, firing_id=str(self.request.id))
