"""Schedules kept as RedBeat entries: add, list and remove them while beat runs; the crontab objects.

What a schedule is, and its validation, are pure (``pipeline/schedules.py``); this module is their
Celery side.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from celery import Celery
from celery.schedules import crontab, schedule

from pipeline.schedules import CRON_FIELDS, Schedule, ScheduleError, check_cron, check_spec
from pipeline.settings import Settings, get_settings
from storage import keys
from workers.app import QUEUE_BEAT, TASK_RETRAIN, app_for


def configure_beat(capp: Celery, settings: Settings) -> Celery:
    """Point RedBeat at the settings' Redis, under the AaS key prefix, with the configured lock timeout."""
    capp.conf.update(
        redbeat_redis_url=settings.redis_url,
        redbeat_redis_options={},
        redbeat_key_prefix=keys.redbeat_prefix(),
        redbeat_lock_timeout=settings.beat_lock_timeout_s,
        beat_schedule={},
    )
    for attr in ("redbeat_conf", "redbeat_redis"):  # RedBeat caches both on the app; rebuild from this conf
        if hasattr(capp, attr):
            delattr(capp, attr)
    return capp


def beat_app_for(settings: Settings) -> Celery:
    """The Celery app for these settings, with RedBeat configured (used by the CLI's schedule commands)."""
    capp = app_for(settings)
    if capp.conf.get("redbeat_key_prefix") != keys.redbeat_prefix():
        configure_beat(capp, settings)
    return capp


def parse_crontab(text: str) -> crontab:
    """"m h dom mon dow" → a celery crontab; ScheduleError names the field that is wrong."""
    return crontab(**dict(zip(CRON_FIELDS, check_cron(text), strict=True)))


def celery_schedule(sched: Schedule) -> crontab | schedule:
    if sched.cron is not None:
        return parse_crontab(sched.cron)
    return schedule(run_every=timedelta(seconds=float(sched.interval_s or 0)))


def entry_fields(sched: Schedule) -> dict[str, Any]:
    """A beat entry's fields (task, schedule, kwargs, options): the task gets the whole schedule as JSON."""
    return {"task": TASK_RETRAIN, "schedule": celery_schedule(sched),
            "kwargs": {"schedule": sched.model_dump(mode="json")}, "options": {"queue": QUEUE_BEAT}}


@dataclass(frozen=True)
class ScheduleInfo:
    """A schedule with what beat and the retrain task recorded about it."""

    schedule: Schedule
    last_run_at: datetime | None
    fired: int
    last_outcome: dict[str, str]

    def to_dict(self) -> dict[str, Any]:
        return {**self.schedule.model_dump(mode="json"), "every": self.schedule.every(),
                "last_run_at": self.last_run_at.isoformat() if self.last_run_at else None,
                "fired": self.fired, "last_outcome": self.last_outcome}


class ScheduleStore:
    """Add, list and remove schedules at run time (RedBeat entries; a running beat picks changes up)."""

    def __init__(self, app: Celery) -> None:
        from redbeat.schedulers import RedBeatSchedulerEntry, ensure_conf, get_redis

        self.app = app
        self._entry = RedBeatSchedulerEntry
        self.conf = ensure_conf(app)
        self.redis = get_redis(app)  # decode_responses=True

    def add(self, sched: Schedule, *, replace: bool = False) -> Schedule:
        check_spec(sched)
        key = self._entry.generate_key(self.app, sched.name)
        if not replace and self.redis.exists(key):
            raise ScheduleError(f"schedule {sched.name!r} exists (remove it first, or replace it)")
        self._entry(name=sched.name, app=self.app, **entry_fields(sched)).save()
        return sched

    def get(self, name: str) -> ScheduleInfo:
        key = self._entry.generate_key(self.app, name)
        try:
            entry = self._entry.from_key(key, app=self.app)
        except KeyError:
            raise ScheduleError(f"no schedule {name!r} (aas schedule list shows them)") from None
        return self._info(entry)

    def list(self) -> list[ScheduleInfo]:
        out = []
        for key in self.redis.zrange(self.conf.schedule_key, 0, -1):
            try:
                entry = self._entry.from_key(key, app=self.app)
            except KeyError:
                continue  # removed while we listed
            if entry.task == TASK_RETRAIN:
                out.append(self._info(entry))
        return sorted(out, key=lambda i: i.schedule.name)

    def remove(self, name: str) -> None:
        self.get(name)
        self._entry(name=name, app=self.app).delete()
        self.redis.srem(self.conf.statics_key, name)

    def _info(self, entry: Any) -> ScheduleInfo:
        sched = Schedule.model_validate(entry.kwargs["schedule"])
        last = self.redis.xrevrange(keys.schedule_runs(sched.name), count=1)
        return ScheduleInfo(schedule=sched, last_run_at=entry.last_run_at,
                            fired=int(self.redis.get(keys.schedule_fired(sched.name)) or 0),
                            last_outcome=dict(last[0][1]) if last else {})


def open_schedules(settings: Settings | None = None) -> ScheduleStore:
    """The schedule store of the Redis the settings name (the beat app's RedBeat configuration)."""
    return ScheduleStore(beat_app_for(settings or get_settings()))
