"""A worker's healthcheck that does not depend on the worker being idle.

``celery inspect ping`` is answered by the thread that runs tasks: a ``--pool=solo`` worker busy on a
17 s GPU task does not reply, and a healthcheck built on it restarts every busy worker. Instead, a
daemon thread in the worker process writes a small heartbeat file every ``HEARTBEAT_INTERVAL_S``
(atomically: a temporary file, then a rename), whatever the task thread is doing; the check reads the
file's age::

    AAS_HEALTH_FILE=/tmp/aas-worker.health celery -A workers.app worker ...   # writes the heartbeat
    python -m workers.health --max-age 30                                      # exit 0 healthy, 1 not

The file also says which task the worker runs and since when (``task``, ``task_since``), so a
``docker exec ... cat`` shows a busy worker as busy. A process that died, or froze whole (the
interpreter, not only the task), stops writing and fails the check after ``--max-age`` seconds. A
task that hangs while the process lives is the time limit's and the watchdog's business, not the
container restart's.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

from celery.signals import task_postrun, task_prerun, worker_ready, worker_shutdown

log = logging.getLogger(__name__)

HEARTBEAT_INTERVAL_S = 5.0
DEFAULT_MAX_AGE_S = 30.0  # six missed heartbeats


class Heartbeat:
    """Writes ``{"pid", "worker", "at", "task", "task_since"}`` to `path` every `interval_s` seconds."""

    def __init__(self, path: Path, worker: str, interval_s: float = HEARTBEAT_INTERVAL_S) -> None:
        self.path, self.worker, self.interval_s = Path(path), worker, interval_s
        self.task: str | None = None
        self.task_since: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="aas-heartbeat", daemon=True)

    def start(self) -> None:
        self.beat()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self.path.unlink(missing_ok=True)

    def beat(self) -> None:
        body = {"pid": os.getpid(), "worker": self.worker, "at": time.time(), "task": self.task,
                "task_since": self.task_since}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(body))
        os.replace(tmp, self.path)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.beat()
            except OSError as e:  # a full disk fails the check later; the worker itself goes on
                log.warning("heartbeat %s: %s", self.path, e)


def check(path: Path, max_age_s: float = DEFAULT_MAX_AGE_S, now: float | None = None) -> tuple[bool, str]:
    """(healthy, one line saying why) for the heartbeat file at `path`."""
    try:
        body: dict[str, Any] = json.loads(Path(path).read_text())
        at = float(body["at"])
    except FileNotFoundError:
        return False, f"no heartbeat file {path} (worker not started, or AAS_HEALTH_FILE differs)"
    except (OSError, ValueError, KeyError, TypeError) as e:
        return False, f"unreadable heartbeat file {path}: {e}"
    age = (time.time() if now is None else now) - at
    if age > max_age_s:
        return False, f"heartbeat of {body.get('worker')} is {age:.0f} s old (limit {max_age_s:.0f} s)"
    doing = f"running {body['task']} for {age_since(body.get('task_since'), now):.0f} s" if body.get("task") else "idle"
    return True, f"{body.get('worker')} alive ({age:.1f} s ago), {doing}"


def age_since(t: Any, now: float | None = None) -> float:
    return (time.time() if now is None else now) - float(t) if isinstance(t, (int, float)) else 0.0


# ---------------------------------------------------------------- worker signals

_heartbeat: Heartbeat | None = None
_consumer: Any = None


@worker_ready.connect
def _start_heartbeat(sender: Any = None, **_: Any) -> None:
    global _heartbeat, _consumer
    from pipeline.settings import get_settings

    _consumer = sender  # the worker's Consumer: its event dispatcher is flushed when a task starts
    path = get_settings().health_file
    if path is None or _heartbeat is not None:
        return
    _heartbeat = Heartbeat(path, getattr(sender, "hostname", None) or "worker")
    _heartbeat.start()
    log.info("heartbeat every %.0f s in %s", HEARTBEAT_INTERVAL_S, path)


@task_prerun.connect
def _task_started(task: Any = None, **_: Any) -> None:
    if _heartbeat is not None:
        _heartbeat.task, _heartbeat.task_since = getattr(task, "name", "?"), time.time()
    flush_task_events()


def flush_task_events() -> None:
    """Send the buffered task-received/task-started events now, before the task runs.

    A worker with an event loop (Redis transport, solo pool included) buffers task events and sends
    them from the loop, which a solo worker does not run while a task holds it: Flower then shows a
    running task only once it has finished ("Active" stays 0 mid-job). This runs on the task's thread,
    the loop's own thread under the solo pool.
    """
    dispatcher = getattr(_consumer, "event_dispatcher", None)
    if dispatcher is None or not getattr(dispatcher, "enabled", False):
        return
    try:
        dispatcher.flush(errors=False, groups=True)
    except Exception as e:  # noqa: BLE001 - events are for monitoring; the task runs regardless
        log.debug("could not flush task events: %s", e)


@task_postrun.connect
def _task_finished(**_: Any) -> None:
    if _heartbeat is not None:
        _heartbeat.task, _heartbeat.task_since = None, None


@worker_shutdown.connect
def _stop_heartbeat(**_: Any) -> None:
    if _heartbeat is not None:
        _heartbeat.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m workers.health",
                                description="exit 0 when the worker's heartbeat file is fresh, 1 otherwise")
    p.add_argument("--file", type=Path, help="heartbeat file (default: AAS_HEALTH_FILE)")
    p.add_argument("--max-age", type=float, default=DEFAULT_MAX_AGE_S, dest="max_age",
                   help=f"seconds a heartbeat stays fresh (default {DEFAULT_MAX_AGE_S:.0f})")
    args = p.parse_args(argv)
    path = args.file
    if path is None:
        from pipeline.settings import get_settings

        path = get_settings().health_file
    if path is None:
        print("aas: no heartbeat file: set AAS_HEALTH_FILE (or --file)", file=sys.stderr)
        return 2
    ok, why = check(path, args.max_age)
    print(why, file=sys.stdout if ok else sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
