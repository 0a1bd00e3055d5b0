"""``aas top``: a live terminal view of jobs, workers and queue depths (``--once`` prints one frame).

``collect`` reads a snapshot (job state from Redis with each running job's liveness: time since its last
progress, relaunches, and the tasks holding leases and where; workers through Celery's control ``ping`` and
``active``; queue depths as LLEN of the Redis broker's lists or RabbitMQ's ready counts); ``render`` turns it
into text. Both are plain functions so a test can drive them without a terminal.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import redis

from storage.jobstate import JobStore
from storage.leases import LeaseBook
from workers.app import QUEUES
from workers.metrics import queue_depths as redis_queue_depths

CLEAR = "\x1b[H\x1b[2J"


@dataclass
class Snapshot:
    """One frame's data."""

    taken_at: float
    jobs: list[dict[str, Any]] = field(default_factory=list)
    workers: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # name → its active tasks
    queues: dict[str, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


def queue_depths(r: redis.Redis, queues: tuple[str, ...] = QUEUES) -> dict[str, int]:
    """Messages waiting in each queue of a Redis broker (all priority levels together)."""
    return redis_queue_depths(r, queues)


def worker_tasks(app: Any, timeout_s: float = 1.0) -> dict[str, list[dict[str, Any]]]:
    """Workers that answer a ping, each with the tasks it is running now."""
    insp = app.control.inspect(timeout=timeout_s)
    alive = insp.ping() or {}
    active = (insp.active() or {}) if alive else {}
    return {name: list(active.get(name, [])) for name in sorted(alive)}


def collect(r: redis.Redis, app: Any | None, *, limit: int = 15, timeout_s: float = 1.0,
            depths: Callable[[], dict[str, int]] | None = None) -> Snapshot:
    """Read one snapshot; a part that cannot be read is named in `problems`, the rest is still shown.
    `depths` reads the broker's queue depths (default: the Redis lists on `r`)."""
    snap = Snapshot(taken_at=time.time())
    jobs = JobStore(r)
    book = LeaseBook(r, ttl_s=1.0)  # read-only here: the TTL is the workers'
    try:
        for job_id in jobs.list(limit):
            st = jobs.get(job_id)
            row = {**st.to_dict(), "model": st.spec.get("model", "?"), "mode": st.spec.get("mode", "")}
            if st.status == "running":
                row["liveness"] = book.summary(job_id, st.fields, snap.taken_at)
            else:
                row["liveness"] = {"relaunches": int(st.fields.get("relaunches") or 0)}
            snap.jobs.append(row)
        if depths is None:
            snap.queues = queue_depths(r)
    except redis.RedisError as e:
        snap.problems.append(f"redis: {e}")
    if depths is not None:
        try:
            snap.queues = depths()
        except Exception as e:  # noqa: BLE001 - the broker may be down; say so in the frame
            snap.problems.append(f"broker: {type(e).__name__}: {e}")
    if app is not None:
        try:
            snap.workers = worker_tasks(app, timeout_s)
        except Exception as e:  # noqa: BLE001 - the broker may be down; say so in the frame
            snap.problems.append(f"workers: {type(e).__name__}: {e}")
    return snap


def _bar(done: int, total: int, width: int = 12) -> str:
    if total <= 0:
        return " " * width
    filled = min(width, round(width * done / total))
    return "█" * filled + "·" * (width - filled)


def _task_line(t: dict[str, Any]) -> str:
    args, kwargs = t.get("args"), t.get("kwargs")
    shown = ", ".join(str(a) for a in args) if isinstance(args, (list, tuple)) else str(args or "")
    if isinstance(kwargs, dict) and kwargs:  # shard tasks travel with named arguments (workers/app.py)
        shown = ", ".join([*([shown] if shown else []), *(f"{k}={v}" for k, v in kwargs.items())])
    started = t.get("time_start")
    age = f" {time.time() - float(started):.0f}s" if isinstance(started, (int, float)) else ""
    return f"{t.get('name', '?')}({shown}){age}"


def render(snap: Snapshot, *, width: int = 110) -> str:
    """The frame as text, at most `width` columns per line."""
    out = [f"aas top · {time.strftime('%H:%M:%S', time.localtime(snap.taken_at))}"]
    out.append("")
    out.append("QUEUES  " + "   ".join(f"{q} {n}" for q, n in snap.queues.items()))
    out.append("")
    out.append(f"WORKERS ({len(snap.workers)})")
    if not snap.workers:
        out.append("  none answering")
    for name, tasks in snap.workers.items():
        out.append(f"  {name:<32} {'busy' if tasks else 'idle'}")
        for t in tasks:
            out.append(f"    {_task_line(t)}")
    out.append("")
    out.append(f"JOBS ({len(snap.jobs)} most recent)")
    out.append(f"  {'id':<12} {'status':<10} {'model':<14} {'mode':<5} {'version':>9} {'':<12} {'acc':>7} "
               f"{'progress':>9} {'relaunch':>8}")
    for j in snap.jobs:
        acc = j.get("test_accuracy")
        version = f"{j['version']}/{j['total_rounds']}"
        live = j.get("liveness") or {}
        since = live.get("since_progress_s")
        out.append(f"  {j['job_id']:<12} {j['status']:<10} {str(j['model'])[:14]:<14} {str(j['mode'])[:5]:<5} "
                   f"{version:>9} {_bar(j['version'], j['total_rounds'])} "
                   + (f"{acc:7.4f}" if isinstance(acc, float) else f"{'-':>7}")
                   + f" {(f'{since:.0f}s ago' if since is not None else '-'):>9} {live.get('relaunches', 0):>8}")
        for t in live.get("tasks", []):
            age = snap.taken_at - float(t["started"])
            state = t["state"] if t["alive"] else "LOST"
            out.append(f"    {t['slot']:<10} {t['what'][:48]:<48} on {t['worker'][:30]:<30} {age:5.0f}s {state}")
        if j.get("error"):
            out.append(f"    error: {j['error']}")
    for p in snap.problems:
        out.append(f"! {p}")
    return "\n".join(line[:width] for line in out)


def _broker_depths(settings: Any, r: redis.Redis) -> Callable[[], dict[str, int]]:
    """Queue depths on the configured broker: Redis lists (on the state Redis or another), or RabbitMQ's counts."""
    if settings.broker_kind() == "rabbitmq":
        from workers.liveness import RabbitProbe

        return RabbitProbe(settings.broker(), QUEUES).depths
    broker = r if settings.broker() == settings.redis_url else redis.Redis.from_url(settings.broker(),
                                                                                     socket_connect_timeout=3)
    return lambda: queue_depths(broker)


def run_top(*, once: bool = False, interval_s: float = 2.0, limit: int = 15, stream: Any = None) -> int:
    """Print frames until Ctrl-C (or one with `once`). Exit status 0; 2 when Redis cannot be reached at all."""
    from pipeline.settings import get_settings
    from workers.app import app_for

    stream = stream or sys.stdout
    settings = get_settings()
    r = redis.Redis.from_url(settings.redis_url, socket_connect_timeout=3, socket_timeout=5)
    app = app_for(settings)
    depths = _broker_depths(settings, r)
    try:
        r.ping()
    except redis.RedisError as e:
        print(f"aas: cannot reach Redis at {settings.redis_display()}: {e}", file=sys.stderr)
        return 2
    try:
        while True:
            frame = render(collect(r, app, limit=limit, timeout_s=min(1.0, interval_s), depths=depths))
            stream.write(frame + "\n" if once else CLEAR + frame + "\n")
            stream.flush()
            if once:
                return 0
            time.sleep(interval_s)
    except KeyboardInterrupt:
        return 0
    finally:
        r.close()
