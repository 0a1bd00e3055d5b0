"""The `aas` command: demo, submit, status, events, wait, cancel, resume (and `models`, `schedule` where present).

Output: readable lines by default, strict JSON with ``--json`` (NaN as null, ISO 8601 times). Errors:
one line, ``aas: ...``, no traceback; exit codes in pipeline/client/output.py (README, "Exit codes").
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from pipeline.client.output import (
    EXIT_INTERRUPTED,
    EXIT_JOB_FAILED,
    EXIT_OK,
    EXIT_TIMEOUT,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
    fail,
    fmt,
    iso_time,
    print_json,
    progress_printer,
    quiet_broken_pipe,
)


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("aas")
    except PackageNotFoundError:
        return "unknown"


def _spec_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--spec", metavar="FILE", help="a JSON file with the job spec (the options below override it)")
    p.add_argument("--model", help="built-in model (digits-cnn, char-lm) or a user factory 'module:function'")
    p.add_argument("--dataset", help="built-in data set (digits, chars) or a user loader 'module:function'")
    p.add_argument("--shards", type=int, metavar="N", help="data shards, one shard task each per round")
    p.add_argument("--epochs", type=int, metavar="N", help="passes over the training data")
    p.add_argument("--mode", choices=["sync", "async"], help="sync: rounds with a barrier; async: apply on arrival")
    p.add_argument("--local-steps", type=int, dest="local_steps", metavar="H",
                   help="inner steps per shard task (DiLoCo when > 1)")
    p.add_argument("--batch-size", type=int, dest="batch_size", metavar="N", help="samples per mini-batch per shard")
    p.add_argument("--lr", type=float, help="learning rate (outer_lr with local steps)")
    p.add_argument("--codec", help="gradient codec: none, fp16, bf16, int8, topk, topk+int8, topk+q8, topk+q4, topk+q2")
    p.add_argument("--seed", type=int, help="seed of the shuffle and the initial weights")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=JSON",
                   help="any other spec field, e.g. --set target_accuracy=0.97 (repeatable)")


def _spec_from(args: argparse.Namespace) -> dict[str, Any]:
    spec: dict[str, Any] = {}
    if getattr(args, "spec", None):
        try:
            with open(args.spec) as f:
                spec.update(json.load(f))
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"--spec {args.spec}: {e}") from None
    for name in ("model", "dataset", "shards", "epochs", "mode", "local_steps", "batch_size", "lr", "codec", "seed"):
        v = getattr(args, name, None)
        if v is not None:
            spec[name] = v
    for item in args.set:
        field, sep, raw = item.partition("=")
        if not sep or not field:
            raise ValueError(f"--set {item!r}: expected FIELD=JSON, e.g. --set epochs=1")
        try:
            spec[field] = json.loads(raw)
        except json.JSONDecodeError:
            spec[field] = raw
    return spec


def _liveness_line(live: dict[str, Any]) -> str:
    parts = []
    if live.get("since_progress_s") is not None:
        parts.append(f"progress {live['since_progress_s']:.0f}s ago")
    if live.get("tasks"):
        lost = sum(not t["alive"] for t in live["tasks"])
        parts.append(f"{len(live['tasks'])} tasks" + (f" ({lost} lease lost)" if lost else ""))
    if live.get("relaunches"):
        parts.append(f"relaunched {live['relaunches']}")
    return ("  " + ", ".join(parts)) if parts else ""


def _json_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print strict JSON (for scripts) instead of text")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="aas", description="Asynchronous training and online model updates",
        epilog="exit codes: 0 done, 1 job failed or cancelled, 2 bad request, 3 service unreachable, "
               "124 wait timed out, 130 interrupted")
    parser.add_argument("--version", action="version", version=f"aas {version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    d = sub.add_parser("demo", help="train digits-cnn end to end on embedded services")
    d.add_argument("--workers", type=int, default=2, metavar="N", help="shard worker processes (default 2)")
    _spec_args(d)
    d.add_argument("--json", action="store_true", help="print one JSON object (a summary) instead of text")
    d.add_argument("--keep", action="store_true", help="keep the demo's folder (logs, store) after it ends")
    d.add_argument("--no-serve", action="store_true", help="do not run an inference worker alongside")

    s = sub.add_parser("submit", help="submit a job; prints its id")
    _spec_args(s)
    s.add_argument("--wait", action="store_true", help="then wait for the job to end, showing progress on stderr")
    s.add_argument("--timeout", type=float, metavar="SECONDS", help="with --wait: give up after this long")
    _json_flag(s)

    st = sub.add_parser("status", help="a job's state (or the list of jobs)")
    st.add_argument("job", nargs="?", help="job id (omit to list jobs)")
    st.add_argument("--limit", type=int, default=20, metavar="N", help="jobs listed, newest first (default 20)")
    _json_flag(st)

    w = sub.add_parser("wait", help="wait for a job to end, showing progress per version on stderr")
    w.add_argument("job", help="job id")
    w.add_argument("--timeout", type=float, metavar="SECONDS", help="give up after this long (exit 124)")
    w.add_argument("--quiet", "-q", action="store_true", help="no progress lines")
    _json_flag(w)

    ev = sub.add_parser("events", help="a job's event stream: retries, rejections, relaunches, failures")
    ev.add_argument("job", help="job id")
    ev.add_argument("--count", type=int, default=100, help="newest N events (default 100)")
    ev.add_argument("--json", action="store_true", help="one strict JSON object per line")

    c = sub.add_parser("cancel", help="cancel a job")
    c.add_argument("job", help="job id")
    _json_flag(c)

    r = sub.add_parser("resume", help="re-enqueue a job from its last committed version")
    r.add_argument("job", help="job id")
    _json_flag(r)

    for mod in ("pipeline.client.cli_models", "pipeline.client.cli_ops"):
        try:
            module = __import__(mod, fromlist=["register_cli"])
        except ImportError:
            continue
        module.register_cli(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import redis

    from pipeline.client import ServiceUnavailable
    from pipeline.settings import get_settings
    from pipeline.spec import SpecError
    from storage.jobstate import JobNotFound
    from storage.objectstore import StoreError
    from storage.registry import RegistryError

    try:
        code = _dispatch(args)
        sys.stdout.flush()  # a closed pipe shows here, inside the try, not at interpreter exit
        return code
    except BrokenPipeError:
        return quiet_broken_pipe()
    except KeyboardInterrupt:
        return fail("interrupted", EXIT_INTERRUPTED)
    except (SpecError, JobNotFound, RegistryError, ValueError) as e:
        return fail(str(e), EXIT_USAGE)
    except ServiceUnavailable as e:
        return fail(str(e), EXIT_UNAVAILABLE)
    except redis.RedisError as e:
        return fail(f"cannot reach Redis at {get_settings().redis_display()}: {e} (set AAS_REDIS_URL or start Redis)",
                    EXIT_UNAVAILABLE)
    except StoreError as e:
        return fail(f"object store unavailable: {e}", EXIT_UNAVAILABLE)
    except TimeoutError as e:
        return fail(str(e), EXIT_TIMEOUT)


def _final_line(st: dict[str, Any]) -> str:
    took = ""
    if isinstance(st.get("started_at"), (int, float)) and isinstance(st.get("finished_at"), (int, float)):
        took = f" in {st['finished_at'] - st['started_at']:.0f} s"
    line = (f"job {st['job_id']} {st['status']}: version {st['version']}/{st['total_rounds']}{took}, "
            f"test accuracy {fmt(st.get('test_accuracy'))}, loss {fmt(st.get('test_loss'))}")
    return line + (f"\n  error: {st['error']}" if st.get("error") else "")


def _ended(st: dict[str, Any]) -> int:
    return EXIT_OK if st["status"] == "succeeded" else EXIT_JOB_FAILED


def _print_status(st: dict[str, Any]) -> None:
    metrics = st.pop("metrics", [])
    st.pop("spec", None)
    live = st.pop("liveness", None) or {}
    for k, v in st.items():
        print(f"{k:>16}: {fmt(iso_time(v)) if k.endswith('_at') else fmt(v)}")
    if live.get("since_progress_s") is not None:
        print(f"{'progress':>16}: {live['since_progress_s']:.0f} s ago")
    print(f"{'relaunches':>16}: {live.get('relaunches', 0)}")
    for t in live.get("tasks", []):
        print(f"{'task':>16}: {t['slot']} {t['what']} on {t['worker']} "
              f"(since {iso_time(t['started'])}, {t['state'] if t['alive'] else 'lease LOST'})")
    if metrics:
        last = metrics[-1]
        print(f"{'last version':>16}: v{last.get('version')}  loss {fmt(last.get('loss'))}  "
              f"acc {fmt(last.get('accuracy'))}  at {iso_time(last.get('t'))}")


def _dispatch(args: argparse.Namespace) -> int:
    handler = getattr(args, "run", None) or getattr(args, "func", None)
    if handler is not None:
        return int(handler(args))
    if args.command == "demo":
        from pipeline.client.demo import DemoOptions, print_summary, run_demo

        spec = _spec_from(args)
        known = {k: spec.pop(k) for k in ("model", "dataset", "shards", "epochs", "mode", "local_steps", "codec")
                 if k in spec}
        opts = DemoOptions(workers=args.workers, as_json=args.json, keep=args.keep, serve=not args.no_serve,
                           spec_overrides=tuple(spec.items()), **known)
        summary = run_demo(opts)
        print_summary(summary, args.json)
        return EXIT_OK if summary["status"] == "succeeded" else EXIT_JOB_FAILED

    from pipeline.client import Client

    client = Client()
    if args.command == "submit":
        job_id = client.submit(_spec_from(args))
        if not args.wait:
            if args.json:
                print_json({"job_id": job_id})
            else:
                print(job_id)
            return EXIT_OK
        print(f"submitted job {job_id}", file=sys.stderr)
        final = client.wait(job_id, timeout=args.timeout, on_progress=progress_printer())
        final = {k: v for k, v in final.items() if k not in ("metrics", "spec")}
        if args.json:
            print_json(final)
        else:
            print(_final_line(final))
        return _ended(final)
    if args.command == "status":
        if not args.job:
            rows = client.list(limit=max(1, args.limit))
            if args.json:
                print_json(rows)
                return EXIT_OK
            if not rows:
                print("no jobs (aas submit, or aas demo)")
            for row in rows:
                print(f"{row['job_id']}  {row['status']:<10} v{row['version']}/{row['total_rounds']:<6} "
                      f"created {iso_time(row.get('created_at'))}  acc {fmt(row.get('test_accuracy'))}"
                      + _liveness_line(row.get("liveness") or {}))
            return EXIT_OK
        st = client.status(args.job)
        if args.json:
            print_json(st)
        else:
            _print_status(st)
        return EXIT_OK
    if args.command == "wait":
        progress = None if args.quiet else progress_printer()
        final = client.wait(args.job, timeout=args.timeout, on_progress=progress)
        final = {k: v for k, v in final.items() if k not in ("metrics", "spec", "liveness")}
        if args.json:
            print_json(final)
        else:
            print(_final_line(final))
        return _ended(final)
    if args.command == "events":
        for e in client.events(args.job, count=args.count):
            if args.json:
                print_json(e)
                continue
            rest = "  ".join(f"{k}={v}" for k, v in e.items() if k not in ("id", "t", "kind"))
            print(f"{iso_time(float(e.get('t', 0)))}  {e['kind']:<10} {rest}")
        return EXIT_OK
    if args.command == "cancel":
        moved = client.cancel(args.job)
        if args.json:
            print_json({"job_id": args.job, "cancelled": moved})
        else:
            print(f"job {args.job} cancelled" if moved else f"job {args.job} had already ended")
        return EXIT_OK
    if args.command == "resume":
        st = client.resume(args.job)
        if args.json:
            print_json(st)
        else:
            print(f"job {st['job_id']} {st['status']} from version {st['version']}/{st['total_rounds']}")
        return EXIT_OK
    return fail(f"unknown command {args.command}")


if __name__ == "__main__":
    raise SystemExit(main())
