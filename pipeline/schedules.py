"""Scheduled retraining: what a schedule is, how it is validated, and where it is kept.

A schedule fires the ``aas.retrain`` task (``workers/beat.py``) on a crontab or every N seconds. The
task looks for new objects under the schedule's dataset prefix and, when there are some, submits a
fine-tune job of the schedule's registry model.

Schedules are RedBeat entries in Redis (keys under ``keys.redbeat_prefix()``), so they can be added and
removed while beat runs, and RedBeat's lock lets only one of several beats fire them. Schedules named in
``AAS_SCHEDULES_JSON`` are installed each time beat starts::

    AAS_SCHEDULES_JSON='[{"name": "nightly", "model": "digits-cnn", "cron": "0 3 * * *"}]'

A schedule that does not validate (bad crontab field, both or neither of cron and interval_s, a spec
override the job spec refuses) raises ``ScheduleError`` naming the problem, and nothing is scheduled.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from celery.schedules import crontab, schedule
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from storage import keys

if TYPE_CHECKING:
    from celery import Celery

    from pipeline.settings import Settings

RETRAIN_TASK = "aas.retrain"
QUEUE_BEAT = "beat"  # the queue retrain tasks go to; a light worker (or the aggregator) consumes it
CRON_FIELDS = ("minute", "hour", "day_of_month", "month_of_year", "day_of_week")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class ScheduleError(ValueError):
    """An invalid or unknown schedule. The message names the schedule, the field and the problem."""


def parse_crontab(text: str) -> crontab:
    """"m h dom mon dow" → a celery crontab; ScheduleError names the field that is wrong."""
    parts = str(text).split()
    if len(parts) != len(CRON_FIELDS):
        raise ScheduleError(f"cron {text!r}: expected 5 fields 'minute hour day-of-month month day-of-week', "
                            f"got {len(parts)}")
    for name, value in zip(CRON_FIELDS, parts, strict=True):
        try:
            crontab(**{name: value})
        except Exception as e:  # noqa: BLE001 - celery raises ValueError or its parser's own exception
            raise ScheduleError(f"cron {text!r}: {name} field {value!r} is not valid ({e})") from None
    return crontab(**dict(zip(CRON_FIELDS, parts, strict=True)))


class Schedule(BaseModel):
    """Retrain registry model `model` (starting from `alias`) when new objects arrive under `dataset_prefix`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    model: str  # registry model name; also the job spec's model (a built-in name or "module:factory")
    alias: str = "production"
    dataset_prefix: str = ""  # empty: "incoming/<name>/"
    spec: dict[str, Any] = Field(default_factory=dict)  # job spec overrides for the fine-tune job
    cron: str | None = None  # "m h dom mon dow"
    interval_s: float | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _check(self) -> Schedule:
        if not _NAME.match(self.name):
            raise ValueError(f"name: {self.name!r} must be 1-64 letters, digits, '_', '.' or '-'")
        if (self.cron is None) == (self.interval_s is None):
            raise ValueError("give exactly one of cron (\"m h dom mon dow\") and interval_s")
        if self.cron is not None:
            parse_crontab(self.cron)
        if not self.dataset_prefix:
            object.__setattr__(self, "dataset_prefix", f"incoming/{self.name}/")
        return self

    def celery_schedule(self) -> crontab | schedule:
        if self.cron is not None:
            return parse_crontab(self.cron)
        return schedule(run_every=timedelta(seconds=float(self.interval_s or 0)))

    def every(self) -> str:
        return f"cron {self.cron}" if self.cron is not None else f"every {self.interval_s:g} s"


def parse_schedule(data: dict[str, Any], *, where: str = "schedule") -> Schedule:
    """Validate a dict into a Schedule whose fine-tune spec also validates; ScheduleError otherwise."""
    try:
        sched = Schedule.model_validate(data)
    except ValidationError as e:
        problems = []
        for err in e.errors():
            field = ".".join(str(p) for p in err["loc"])
            msg = err["msg"].removeprefix("Value error, ")
            problems.append(f"{field}: {msg}" if field else msg)
        name = data.get("name") if isinstance(data, dict) else None
        raise ScheduleError(f"invalid {where}{f' {name!r}' if name else ''}: " + "; ".join(problems)) from None
    check_spec(sched)
    return sched


def retrain_spec(sched: Schedule, new_keys: list[str] | None = None, from_version: int | None = None
                 ) -> dict[str, Any]:
    """The job spec a firing submits: the overrides, with the schedule's model, registered back under it.

    With `new_keys`, the job trains on exactly those objects (data shards: blobs of x, y tensors) and,
    when the alias points at a version, starts from that version's weights (a fine-tune).
    """
    spec = dict(sched.spec)
    spec["model"] = sched.model
    spec.setdefault("register_as", sched.model)
    spec.setdefault("promote", sched.alias)
    if new_keys:
        test = spec.get("dataset", "digits") if spec.get("dataset") != "objects" else "digits"
        spec["dataset"] = "objects"
        spec["dataset_args"] = {"keys": list(new_keys), "test_dataset": test}
        spec["shards"] = min(int(spec.get("shards", 2)), len(new_keys))
        if from_version is not None:
            spec["init_from"] = f"{sched.model}@{from_version}"
    return spec


def check_spec(sched: Schedule) -> None:
    from pipeline.spec import SpecError, parse_spec

    try:
        parse_spec(retrain_spec(sched))
    except SpecError as e:
        raise ScheduleError(f"schedule {sched.name!r}: {e}") from None


def schedules_from_settings(settings: Settings) -> list[Schedule]:
    """The schedules named in AAS_SCHEDULES_JSON (a JSON list of schedule objects); [] when unset."""
    raw = settings.schedules_json
    if not raw or not raw.strip():
        return []
    try:
        items = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ScheduleError(f"AAS_SCHEDULES_JSON is not valid JSON: {e}") from None
    if not isinstance(items, list):
        raise ScheduleError("AAS_SCHEDULES_JSON must be a JSON list of schedule objects")
    out = [parse_schedule(item, where=f"AAS_SCHEDULES_JSON[{i}]") for i, item in enumerate(items)]
    names = [s.name for s in out]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ScheduleError(f"AAS_SCHEDULES_JSON names a schedule more than once: {', '.join(dupes)}")
    return out


def entry_fields(sched: Schedule) -> dict[str, Any]:
    """A beat entry's fields (task, schedule, kwargs, options): the task gets the whole schedule as JSON."""
    return {"task": RETRAIN_TASK, "schedule": sched.celery_schedule(),
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
            if entry.task == RETRAIN_TASK:
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
    from pipeline.settings import get_settings
    from workers.beat import beat_app_for

    return ScheduleStore(beat_app_for(settings or get_settings()))
