"""Schedules: validation, add/list/remove on RedBeat's records, and one retrain firing (fakeredis, local store)."""

from __future__ import annotations

import argparse
import json
from datetime import timedelta
from typing import Any

import pytest

from pipeline.schedules import ScheduleError, parse_schedule, retrain_spec, schedules_from_settings
from pipeline.settings import Settings
from storage import keys
from storage.jobstate import JobStore
from workers.app import QUEUE_BEAT
from workers.app import TASK_RETRAIN as RETRAIN_TASK
from workers.schedules import ScheduleStore, parse_crontab


@pytest.fixture
def store() -> ScheduleStore:
    import fakeredis
    from celery import Celery

    from workers.beat import configure_beat

    app = Celery("schedules-test", broker="redis://fake/0")
    configure_beat(app, Settings(redis_url="redis://fake/0"))
    app.redbeat_redis = fakeredis.FakeRedis(decode_responses=True)  # RedBeat's client, as get_redis caches it
    return ScheduleStore(app)


def _cli(argv: list[str], store: ScheduleStore) -> int:
    from pipeline.client.cli import build_parser
    from pipeline.client.cli_ops import run_schedule

    args: argparse.Namespace = build_parser().parse_args(["schedule", *argv])
    return run_schedule(args, store=store)


@pytest.mark.parametrize(("cron", "field"), [
    ("61 * * * *", "minute"), ("* 24 * * *", "hour"), ("* * 0 * *", "day_of_month"),
    ("* * * 13 *", "month_of_year"), ("* * * * funday", "day_of_week"), ("*/0 * * * *", "minute"),
])
def test_a_bad_crontab_field_is_named_in_the_error(cron: str, field: str) -> None:
    with pytest.raises(ScheduleError, match=f"{field} field"):
        parse_crontab(cron)


def test_a_crontab_needs_exactly_five_fields() -> None:
    with pytest.raises(ScheduleError, match="expected 5 fields"):
        parse_crontab("*/5 * * *")
    assert parse_crontab("*/5 * * * mon-fri").minute == set(range(0, 60, 5))


def test_a_schedule_needs_exactly_one_of_cron_and_interval() -> None:
    with pytest.raises(ScheduleError, match="exactly one of cron"):
        parse_schedule({"name": "a", "model": "digits-cnn"})
    with pytest.raises(ScheduleError, match="exactly one of cron"):
        parse_schedule({"name": "a", "model": "digits-cnn", "cron": "* * * * *", "interval_s": 5})
    with pytest.raises(ScheduleError, match="interval_s"):
        parse_schedule({"name": "a", "model": "digits-cnn", "interval_s": 0})


def test_a_schedule_whose_fine_tune_spec_is_invalid_is_refused() -> None:
    with pytest.raises(ScheduleError, match="lr"):
        parse_schedule({"name": "a", "model": "digits-cnn", "interval_s": 5, "spec": {"lr": -1}})
    with pytest.raises(ScheduleError, match="unknown model"):
        parse_schedule({"name": "a", "model": "no-such-model", "interval_s": 5})


def test_the_retrain_spec_takes_the_schedules_model_and_registers_back_under_it() -> None:
    s = parse_schedule({"name": "n", "model": "digits-cnn", "alias": "staging", "interval_s": 5,
                        "spec": {"epochs": 1, "model": "ignored"}})
    spec = retrain_spec(s)
    assert spec["model"] == "digits-cnn" and spec["register_as"] == "digits-cnn"
    assert spec["promote"] == "staging" and spec["epochs"] == 1
    assert s.dataset_prefix == "incoming/n/"


def test_schedules_are_added_listed_and_removed_at_run_time(store: ScheduleStore) -> None:
    assert _cli(["add", "fast", "--model", "digits-cnn", "--every", "2", "--dataset-prefix", "new/"], store) == 0
    assert _cli(["add", "nightly", "--model", "digits-cnn", "--cron", "0 3 * * *", "--set", "epochs=1"], store) == 0
    infos = {i.schedule.name: i for i in store.list()}
    assert set(infos) == {"fast", "nightly"}
    assert infos["fast"].schedule.interval_s == 2 and infos["fast"].schedule.dataset_prefix == "new/"
    assert infos["nightly"].schedule.spec == {"epochs": 1}

    entry = store._entry.from_key(store._entry.generate_key(store.app, "fast"), app=store.app)
    assert entry.task == RETRAIN_TASK and entry.options["queue"] == QUEUE_BEAT
    assert entry.schedule.run_every == timedelta(seconds=2)
    assert store.redis.zscore(store.conf.schedule_key, entry.key) is not None
    assert entry.key.startswith(keys.redbeat_prefix())

    assert _cli(["remove", "fast"], store) == 0
    assert [i.schedule.name for i in store.list()] == ["nightly"]
    assert _cli(["remove", "fast"], store) == 2


def test_an_invalid_schedule_from_the_cli_schedules_nothing(store: ScheduleStore, capsys: Any) -> None:
    assert _cli(["add", "bad", "--model", "digits-cnn", "--cron", "0 25 * * *"], store) == 2
    assert "hour field '25'" in capsys.readouterr().err
    assert store.list() == []


def test_adding_a_schedule_that_exists_is_refused_unless_replaced(store: ScheduleStore) -> None:
    assert _cli(["add", "a", "--model", "digits-cnn", "--every", "5"], store) == 0
    assert _cli(["add", "a", "--model", "digits-cnn", "--every", "9"], store) == 2
    assert _cli(["add", "a", "--model", "digits-cnn", "--every", "9", "--replace"], store) == 0
    assert store.get("a").schedule.interval_s == 9


def test_schedules_load_from_the_settings_json_list() -> None:
    raw = json.dumps([{"name": "a", "model": "digits-cnn", "interval_s": 60},
                      {"name": "b", "model": "digits-cnn", "cron": "*/5 * * * *", "dataset_prefix": "in/b/"}])
    got = schedules_from_settings(Settings(schedules_json=raw))
    assert [s.name for s in got] == ["a", "b"] and got[1].dataset_prefix == "in/b/"
    assert schedules_from_settings(Settings(schedules_json=None)) == []
    with pytest.raises(ScheduleError, match=r"AAS_SCHEDULES_JSON\[1\].*minute field"):
        schedules_from_settings(Settings(schedules_json=json.dumps(
            [{"name": "a", "model": "digits-cnn", "interval_s": 1}, {"name": "b", "model": "digits-cnn",
                                                                       "cron": "99 * * * *"}])))
    with pytest.raises(ScheduleError, match="not valid JSON"):
        schedules_from_settings(Settings(schedules_json="[{"))
    with pytest.raises(ScheduleError, match="more than once: a"):
        schedules_from_settings(Settings(schedules_json=json.dumps([{"name": "a", "model": "digits-cnn",
                                                                      "interval_s": 1}] * 2)))


# ---------------------------------------------------------------- one firing


class FakeSubmit:
    def __init__(self, jobs: JobStore, fail: bool = False) -> None:
        self.jobs, self.fail, self.specs = jobs, fail, []

    def __call__(self, spec: dict[str, Any]) -> str:
        if self.fail:
            raise ConnectionError("redis went away")
        self.specs.append(spec)
        job_id = f"job{len(self.specs)}"
        self.jobs.create(job_id, spec, total_rounds=1, fields={})
        return job_id


def _fire(sched: Any, fake_redis: Any, local_store: Any, submit: FakeSubmit, firing: str,
          version: int | None = 7) -> dict[str, Any]:
    from workers.beat import run_retrain

    return run_retrain(sched, r=fake_redis, store=local_store, jobs=JobStore(fake_redis), submit=submit,
                       alias_version=lambda model, alias: version, firing_id=firing)


def test_a_firing_without_new_data_records_skipped_and_submits_nothing(fake_redis: Any, local_store: Any) -> None:
    sched = parse_schedule({"name": "s", "model": "digits-cnn", "interval_s": 2, "dataset_prefix": "in/"})
    submit = FakeSubmit(JobStore(fake_redis))
    out = _fire(sched, fake_redis, local_store, submit, "f1")
    assert out["outcome"] == "skipped" and out["reason"] == "no new data"
    assert submit.specs == []
    assert int(fake_redis.get(keys.schedule_fired("s"))) == 1
    [(_, last)] = fake_redis.xrevrange(keys.schedule_runs("s"), count=1)
    assert last[b"outcome"] == b"skipped"


def test_a_firing_with_new_data_submits_one_fine_tune_job_and_marks_the_data_seen(
        fake_redis: Any, local_store: Any) -> None:
    sched = parse_schedule({"name": "s", "model": "digits-cnn", "alias": "production", "interval_s": 2,
                            "dataset_prefix": "in/", "spec": {"epochs": 1}})
    local_store.put("in/a.aast", b"a")
    local_store.put("in/b.aast", b"b")
    local_store.put("other/c.aast", b"c")
    jobs = JobStore(fake_redis)
    submit = FakeSubmit(jobs)
    out = _fire(sched, fake_redis, local_store, submit, "f1")
    assert out["outcome"] == "submitted" and out["job"] == "job1"
    assert submit.specs == [retrain_spec(sched, ["in/a.aast", "in/b.aast"], 7)]
    assert submit.specs[0]["dataset_args"]["keys"] == ["in/a.aast", "in/b.aast"]
    assert submit.specs[0]["init_from"] == "digits-cnn@7"
    fields = jobs.get("job1").fields
    assert fields["retrain_from"] == "digits-cnn@production" and fields["retrain_from_version"] == "7"
    assert json.loads(fields["retrain_data"]) == ["in/a.aast", "in/b.aast"]
    assert any(e["kind"] == "note" and "v7" in e["text"] for e in jobs.events("job1"))

    assert _fire(sched, fake_redis, local_store, submit, "f2")["reason"] == "no new data"
    local_store.put("in/d.aast", b"d")
    out = _fire(sched, fake_redis, local_store, submit, "f3")
    assert out["outcome"] == "submitted" and json.loads(jobs.get("job2").fields["retrain_data"]) == ["in/d.aast"]
    assert int(fake_redis.get(keys.schedule_fired("s"))) == 3


def test_a_redelivered_firing_does_nothing_the_second_time(fake_redis: Any, local_store: Any) -> None:
    sched = parse_schedule({"name": "s", "model": "digits-cnn", "interval_s": 2, "dataset_prefix": "in/"})
    local_store.put("in/a.aast", b"a")
    submit = FakeSubmit(JobStore(fake_redis))
    assert _fire(sched, fake_redis, local_store, submit, "same")["outcome"] == "submitted"
    assert _fire(sched, fake_redis, local_store, submit, "same")["outcome"] == "duplicate"
    assert len(submit.specs) == 1 and int(fake_redis.get(keys.schedule_fired("s"))) == 1


def test_a_failed_submit_leaves_the_data_for_the_next_firing(fake_redis: Any, local_store: Any) -> None:
    sched = parse_schedule({"name": "s", "model": "digits-cnn", "interval_s": 2, "dataset_prefix": "in/"})
    local_store.put("in/a.aast", b"a")
    jobs = JobStore(fake_redis)
    out = _fire(sched, fake_redis, local_store, FakeSubmit(jobs, fail=True), "f1", version=None)
    assert out["outcome"] == "failed" and "redis went away" in out["reason"]
    out = _fire(sched, fake_redis, local_store, FakeSubmit(jobs), "f2", version=None)
    assert out["outcome"] == "submitted"
    assert jobs.get(out["job"]).fields["retrain_from_version"] == ""
