"""Scheduled retraining: what a schedule is, how it is validated, and where it is kept.

A schedule fires the retrain task (``workers/beat.py``) on a crontab or every N seconds. The
task looks for new objects under the schedule's dataset prefix and, when there are some, submits a
fine-tune job of the schedule's registry model.

This module is the pure part: what a schedule is and how it is validated. Schedules are kept as RedBeat
entries in Redis (``workers/schedules.py``), so they can be added and removed while beat runs, and
RedBeat's lock lets only one of several beats fire them. Schedules named in ``AAS_SCHEDULES_JSON`` are
installed each time beat starts::

    AAS_SCHEDULES_JSON='[{"name": "nightly", "model": "digits-cnn", "cron": "0 3 * * *"}]'

A schedule that does not validate (bad crontab field, both or neither of cron and interval_s, a spec
override the job spec refuses) raises ``ScheduleError`` naming the problem, and nothing is scheduled.
"""

from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

if TYPE_CHECKING:
    from pipeline.settings import Settings

CRON_FIELDS = ("minute", "hour", "day_of_month", "month_of_year", "day_of_week")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class ScheduleError(ValueError):
    """An invalid or unknown schedule. The message names the schedule, the field and the problem."""


# (lowest, highest, names) per crontab field, as cron(5) defines them.
_CRON_RANGES: dict[str, tuple[int, int, tuple[str, ...]]] = {
    "minute": (0, 59, ()),
    "hour": (0, 23, ()),
    "day_of_month": (1, 31, ()),
    "month_of_year": (1, 12, ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec")),
    "day_of_week": (0, 6, ("sun", "mon", "tue", "wed", "thu", "fri", "sat")),
}


def _cron_value(token: str, lo: int, hi: int, names: tuple[str, ...]) -> int:
    low = token.lower()
    if low in names:
        return names.index(low) + (1 if lo == 1 else 0)
    if not token.isdigit():
        raise ValueError(f"{token!r} is not a number{' or a name' if names else ''}")
    v = int(token)
    if not lo <= v <= hi:
        raise ValueError(f"{v} is outside {lo}-{hi}")
    return v


def _check_cron_field(name: str, value: str) -> None:
    lo, hi, names = _CRON_RANGES[name]
    for item in value.split(","):
        rng, _, step = item.partition("/")
        if step and (not step.isdigit() or int(step) == 0):
            raise ValueError(f"step {step!r} must be a positive number")
        if rng == "*":
            continue
        first, _, last = rng.partition("-")
        a = _cron_value(first, lo, hi, names)
        if last and _cron_value(last, lo, hi, names) < a:
            raise ValueError(f"range {rng!r} runs backwards")


def check_cron(text: str) -> list[str]:
    """"m h dom mon dow" → its five fields; ScheduleError names the field that is wrong."""
    parts = str(text).split()
    if len(parts) != len(CRON_FIELDS):
        raise ScheduleError(f"cron {text!r}: expected 5 fields 'minute hour day-of-month month day-of-week', "
                            f"got {len(parts)}")
    for name, value in zip(CRON_FIELDS, parts, strict=True):
        try:
            _check_cron_field(name, value)
        except ValueError as e:
            raise ScheduleError(f"cron {text!r}: {name} field {value!r} is not valid ({e})") from None
    return parts


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
            check_cron(self.cron)
        if not self.dataset_prefix:
            object.__setattr__(self, "dataset_prefix", f"incoming/{self.name}/")
        return self

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
