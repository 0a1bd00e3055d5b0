"""Two real `celery beat` processes (RedBeat) and one real worker: every firing runs the retrain task once."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.integration

INTERVAL_S = 2.0
LOCK_TIMEOUT_S = 3


@pytest.fixture
def beat_group(services_env: dict[str, str], tmp_path: Path) -> Iterator[Any]:
    """A ProcessGroup with one worker on the beat queue; the test starts beats. Everything stops at teardown."""
    from pipeline.client.processes import ProcessGroup, wait_for_workers
    from pipeline.settings import Settings
    from workers.app import QUEUE_BEAT
    from workers.beat import beat_app_for

    env = {**os.environ, **services_env, "PYTHONPATH": str(REPO), "AAS_BEAT_LOCK_TIMEOUT_S": str(LOCK_TIMEOUT_S)}
    group = ProcessGroup(env=env, cwd=REPO, logdir=tmp_path / "logs")
    try:
        group.start("beatworker", [sys.executable, "-m", "celery", "-A", "workers.beat", "worker", "-Q", QUEUE_BEAT,
                                   "--pool=solo", "-n", "beatworker@%h", "-E", "--without-gossip",
                                   "--without-mingle", "--without-heartbeat", "--loglevel=INFO"])
        wait_for_workers(beat_app_for(Settings()), ["beatworker"], timeout_s=90)
        yield group
    finally:
        group.close()
        for log in sorted((tmp_path / "logs").glob("*.log")):
            text = log.read_text(errors="replace")
            if "Traceback" in text:
                print(f"--- {log.name} (tail)\n{text[-3000:]}")


def _start_beat(group: Any, name: str, tmp_path: Path) -> None:
    group.start(name, [sys.executable, "-m", "celery", "-A", "workers.beat", "beat", "-S", "redbeat.RedBeatScheduler",
                       "--max-interval", "1", "--loglevel=INFO", "-s", str(tmp_path / f"{name}-schedule")])


def _fired(r: Any, name: str) -> int:
    from storage import keys

    return int(r.get(keys.schedule_fired(name)) or 0)


def _wait_fired(r: Any, name: str, at_least: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while _fired(r, name) < at_least:
        if time.monotonic() > deadline:
            raise AssertionError(f"schedule {name} fired {_fired(r, name)} times in {timeout_s} s, "
                                 f"expected at least {at_least}")
        time.sleep(0.1)


def _add_schedule(name: str) -> Any:
    import redis

    from pipeline.schedules import parse_schedule
    from pipeline.settings import Settings
    from storage.objectstore import open_store
    from workers.schedules import open_schedules

    open_store(Settings()).check()  # creates the bucket: the retrain task lists the (empty) dataset prefix
    open_schedules(Settings()).add(parse_schedule({"name": name, "model": "digits-cnn", "interval_s": INTERVAL_S,
                                                   "dataset_prefix": f"incoming/{name}/"}))
    return redis.Redis.from_url(Settings().redis_url)


def _sent_by(tmp_path: Path, beat: str, schedule: str) -> int:
    """How many times a beat process logged sending the schedule's task."""
    log = (tmp_path / "logs" / f"{beat}.log").read_text(errors="replace")
    return log.count(f"Sending due task {schedule} ")


def test_two_beats_fire_each_interval_once_not_twice(beat_group: Any, tmp_path: Path) -> None:
    from storage import keys

    r = _add_schedule("every2")
    _start_beat(beat_group, "beat-a", tmp_path)
    _start_beat(beat_group, "beat-b", tmp_path)
    _wait_fired(r, "every2", 4, timeout_s=30 + 6 * INTERVAL_S)
    sent = {b: _sent_by(tmp_path, b, "every2") for b in ("beat-a", "beat-b")}
    # Every firing came from the one beat that holds the lock; the other sent nothing.
    assert sorted(sent.values())[0] == 0 and sorted(sent.values())[1] >= 4, sent
    assert all(beat_group.procs[b].poll() is None for b in ("beat-a", "beat-b")), "a beat exited"
    logs = [(tmp_path / "logs" / f"{b}.log").read_text(errors="replace") for b in ("beat-a", "beat-b")]
    assert sum("Acquired lock" in log for log in logs) == 1, "exactly one beat holds RedBeat's lock"
    [(_, last)] = r.xrevrange(keys.schedule_runs("every2"), count=1)
    assert last[b"outcome"] == b"skipped" and last[b"reason"] == b"no new data"


def test_when_the_beat_holding_the_lock_dies_the_other_takes_over(beat_group: Any, tmp_path: Path) -> None:
    r = _add_schedule("takeover")
    _start_beat(beat_group, "beat-a", tmp_path)
    _wait_fired(r, "takeover", 1, timeout_s=30)
    _start_beat(beat_group, "beat-b", tmp_path)
    _wait_fired(r, "takeover", _fired(r, "takeover") + 2, timeout_s=30)  # beat-b is up while beat-a fires on
    assert "Acquired lock" not in (tmp_path / "logs" / "beat-b.log").read_text(errors="replace")
    assert _sent_by(tmp_path, "beat-b", "takeover") == 0
    beat_group.kill("beat-a")  # SIGKILL: the lock is not released, it must expire
    c0 = _fired(r, "takeover")
    _wait_fired(r, "takeover", c0 + 2, timeout_s=LOCK_TIMEOUT_S + 4 * INTERVAL_S + 5)
    assert "Acquired lock" in (tmp_path / "logs" / "beat-b.log").read_text(errors="replace")
