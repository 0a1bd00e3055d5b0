"""A test-only Celery app: the real one (workers.app, every signal handler included) plus a task that
sleeps, so a test can keep a real `--pool=solo` worker busy for as long as it likes."""

from __future__ import annotations

import time

from workers.app import app

__all__ = ["app", "sleep_task"]

TASK_SLEEP = "tests.sleep"


@app.task(name=TASK_SLEEP, acks_late=False)
def sleep_task(seconds: float) -> float:
    time.sleep(float(seconds))
    return float(seconds)
