"""Operations commands for ``aas``: ``schedule``, ``top``, ``plot`` and ``flower``.

``register_cli(subparsers)`` adds them to the main parser; each sets ``run`` to a function of the
parsed arguments that returns the exit status. A user-fixable error prints one line and exits 2.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from pipeline.client.output import EXIT_UNAVAILABLE, EXIT_USAGE, fail, print_json
from pipeline.settings import Settings


def register_cli(subparsers: Any) -> None:
    """Add ``schedule``, ``top``, ``plot`` and ``flower`` to an argparse subparsers object."""
    p = subparsers.add_parser("schedule", help="scheduled retraining (celery beat via RedBeat)")
    sub = p.add_subparsers(dest="schedule_command", metavar="{add,list,remove}", required=True)
    a = sub.add_parser("add", help="retrain a registry model on a schedule when new data arrives")
    a.add_argument("name", help="schedule name (letters, digits, '-', '_')")
    a.add_argument("--model", required=True, help="registry model name (also the fine-tune job's model)")
    when = a.add_mutually_exclusive_group(required=True)
    when.add_argument("--every", type=float, metavar="SECONDS", help="fire every SECONDS")
    when.add_argument("--cron", metavar='"m h dom mon dow"', help='crontab, e.g. "*/5 * * * *"')
    a.add_argument("--alias", default="production", help="alias the fine-tune starts from (default: production)")
    a.add_argument("--dataset-prefix", dest="dataset_prefix", default="",
                   help="object-store prefix where new data arrives (default: incoming/NAME/)")
    a.add_argument("--set", action="append", default=[], metavar="FIELD=JSON",
                   help="a job spec override for the fine-tune job, e.g. --set epochs=1")
    a.add_argument("--replace", action="store_true", help="replace a schedule of the same name")
    a.set_defaults(run=run_schedule)
    ls = sub.add_parser("list", help="schedules, when they last fired and what happened")
    ls.add_argument("--json", action="store_true", help="print strict JSON instead of text")
    ls.set_defaults(run=run_schedule)
    rm = sub.add_parser("remove", help="remove a schedule (one from AAS_SCHEDULES_JSON returns at beat start)")
    rm.add_argument("name", help="schedule name")
    rm.set_defaults(run=run_schedule)

    t = subparsers.add_parser("top", help="live view of jobs, workers and queue depths")
    t.add_argument("--once", action="store_true", help="print one frame and exit")
    t.add_argument("--interval", type=float, default=2.0, help="seconds between frames (default 2)")
    t.add_argument("--limit", type=int, default=15, help="jobs shown (default 15)")
    t.set_defaults(run=run_top_cmd)

    pl = subparsers.add_parser("plot", help="a job's loss and accuracy per version as a PNG")
    pl.add_argument("job", help="job id")
    pl.add_argument("-o", "--output", default="curve.png", help="PNG file to write (default curve.png)")
    pl.add_argument("--width", type=int, default=1000, help="pixels (default 1000)")
    pl.add_argument("--height", type=int, default=700, help="pixels (default 700)")
    pl.set_defaults(run=run_plot)

    f = subparsers.add_parser("flower", help="start Flower on this system's broker, with basic auth from settings")
    f.add_argument("--port", type=int, default=5555, help="port to serve Flower on (default 5555)")
    f.add_argument("--address", default="127.0.0.1", help="interface to bind (default 127.0.0.1)")
    f.add_argument("--no-auth", action="store_true", help="allow starting without AAS_FLOWER_USER/PASSWORD")
    f.add_argument("--tasks-columns", dest="tasks_columns", default=FLOWER_TASKS_COLUMNS,
                   help=f"columns of Flower's task list (default {FLOWER_TASKS_COLUMNS}; Flower's own omits the "
                        "arguments, so a running task would not show its job, shard and version)")
    f.set_defaults(run=run_flower)


def _fail(message: str, code: int = EXIT_USAGE) -> int:
    return fail(message, code)


# ---------------------------------------------------------------- schedule


def _overrides(items: list[str]) -> dict[str, Any]:
    spec: dict[str, Any] = {}
    for item in items:
        name, sep, raw = item.partition("=")
        if not sep or not name:
            raise ValueError(f"--set {item!r}: expected FIELD=JSON, e.g. --set epochs=1")
        try:
            spec[name] = json.loads(raw)
        except json.JSONDecodeError:
            spec[name] = raw
    return spec


def run_schedule(args: argparse.Namespace, store: Any = None) -> int:
    """``aas schedule add|list|remove``."""
    import redis

    from pipeline.schedules import ScheduleError, parse_schedule
    from workers.schedules import open_schedules

    try:
        if args.schedule_command == "add":
            data: dict[str, Any] = {"name": args.name, "model": args.model, "alias": args.alias,
                                    "dataset_prefix": args.dataset_prefix, "spec": _overrides(args.set)}
            data["cron" if args.cron is not None else "interval_s"] = args.cron if args.cron is not None else args.every
            sched = parse_schedule(data)  # validated before anything is written
            store = store or open_schedules()
            store.add(sched, replace=args.replace)
            print(f"scheduled {sched.name}: retrain {sched.model}@{sched.alias} {sched.every()} "
                  f"when new objects arrive under {sched.dataset_prefix}")
            return 0
        store = store or open_schedules()
        if args.schedule_command == "remove":
            store.remove(args.name)
            print(f"removed {args.name}")
            return 0
        rows = [i.to_dict() for i in store.list()]
        if args.json:
            print_json(rows, indent=2)
            return 0
        if not rows:
            print("no schedules (aas schedule add NAME --model M --every SECONDS)")
        for row in rows:
            last = row["last_outcome"]
            outcome = f"{last.get('outcome', '')}: {last.get('reason', '')}" if last else "never ran"
            print(f"{row['name']:<20} {row['model']}@{row['alias']:<12} {row['every']:<22} "
                  f"{row['dataset_prefix']:<24} fired {row['fired']:<5} {outcome}")
        return 0
    except (ScheduleError, ValueError) as e:
        return _fail(str(e))
    except redis.RedisError as e:
        return _fail(f"cannot reach Redis for schedules: {e} (set AAS_REDIS_URL or start Redis)", EXIT_UNAVAILABLE)


# ---------------------------------------------------------------- top, plot


def run_top_cmd(args: argparse.Namespace) -> int:
    from pipeline.client.top import run_top

    if args.interval <= 0:
        return _fail(f"--interval must be > 0 seconds, got {args.interval}")
    return run_top(once=args.once, interval_s=args.interval, limit=args.limit)


def run_plot(args: argparse.Namespace, redis_client: Any = None) -> int:
    import redis

    from pipeline.client.plot import PlotError, plot_job
    from pipeline.settings import get_settings
    from storage.jobstate import JobNotFound

    settings = get_settings()
    r = redis_client or redis.Redis.from_url(settings.redis_url, socket_connect_timeout=3)
    try:
        path = plot_job(r, args.job, args.output, width_px=args.width, height_px=args.height)
    except (PlotError, JobNotFound) as e:
        return _fail(str(e))
    except redis.RedisError as e:
        return _fail(f"cannot reach Redis at {settings.redis_display()}: {e}", EXIT_UNAVAILABLE)
    print(path)
    return 0


# ---------------------------------------------------------------- flower


FLOWER_TASKS_COLUMNS = "name,uuid,state,kwargs,args,received,started,runtime,worker"
FLOWER_BROKER_POOL_MIN = 32  # connections; Flower's inspector runs ~8 broadcasts at once (see run_flower)


def flower_env(settings: Settings, *, require_auth: bool = True) -> dict[str, str]:
    """Environment for Flower with basic auth from the settings (AAS_FLOWER_USER / AAS_FLOWER_PASSWORD).

    The credentials travel in FLOWER_BASIC_AUTH (Flower reads FLOWER_* options from the environment),
    not on the command line, where any local user could read them in the process list.
    """
    user = settings.flower_user
    password = settings.flower_password.get_secret_value() if settings.flower_password else None
    if user and password:
        if ":" in user or "," in user or "," in password:
            raise ValueError("AAS_FLOWER_USER may not contain ':' or ',', nor AAS_FLOWER_PASSWORD ','")
        return {"FLOWER_BASIC_AUTH": f"{user}:{password}"}
    if require_auth:
        raise ValueError("Flower needs AAS_FLOWER_USER and AAS_FLOWER_PASSWORD (or --no-auth on a trusted host)")
    return {}


def run_flower(args: argparse.Namespace) -> int:
    """``aas flower``: Flower in this process, on the app the settings name, with basic auth from settings.

    Flower's inspector sends about eight control broadcasts at once, each holding a pooled broker
    connection, and its event receiver waits on the same pool to wake the workers: with a small
    ``broker_pool_limit`` every thread waits on the pool and Flower never captures an event (an empty
    task list). Flower gets a pool of at least FLOWER_BROKER_POOL_MIN here.
    """
    from pipeline.settings import get_settings
    from workers.app import app_for

    settings = get_settings()
    try:
        env = flower_env(settings, require_auth=not args.no_auth)
    except ValueError as e:
        return _fail(str(e))
    os.environ.update(env)
    capp = app_for(settings)
    limit = capp.conf.broker_pool_limit
    if limit is not None and limit < FLOWER_BROKER_POOL_MIN:
        capp.conf.broker_pool_limit = FLOWER_BROKER_POOL_MIN
    capp.start(["flower", f"--port={args.port}", f"--address={args.address}",
                f"--tasks_columns={args.tasks_columns}"])
    return 0
