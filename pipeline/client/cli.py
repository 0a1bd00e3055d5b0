"""The `aas` command: demo, submit, status, events, wait, cancel, resume (and `models`, `schedule` where present).

Errors a user can fix (a bad spec, a service that does not answer) print one line and exit 2; no
traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any


def _spec_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--spec", help="a JSON file with the job spec (fields below override it)")
    p.add_argument("--model")
    p.add_argument("--dataset")
    p.add_argument("--shards", type=int)
    p.add_argument("--epochs", type=int)
    p.add_argument("--mode", choices=["sync", "async"])
    p.add_argument("--local-steps", type=int, dest="local_steps")
    p.add_argument("--batch-size", type=int, dest="batch_size")
    p.add_argument("--lr", type=float)
    p.add_argument("--codec")
    p.add_argument("--seed", type=int)
    p.add_argument("--set", action="append", default=[], metavar="FIELD=JSON",
                   help="any other spec field, e.g. --set target_accuracy=0.97")


def _spec_from(args: argparse.Namespace) -> dict[str, Any]:
    spec: dict[str, Any] = {}
    if getattr(args, "spec", None):
        with open(args.spec) as f:
            spec.update(json.load(f))
    for name in ("model", "dataset", "shards", "epochs", "mode", "local_steps", "batch_size", "lr", "codec", "seed"):
        v = getattr(args, name, None)
        if v is not None:
            spec[name] = v
    for item in args.set:
        field, _, raw = item.partition("=")
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="aas", description="Asynchronous training and online model updates")
    sub = parser.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="train digits-cnn end to end on embedded services")
    d.add_argument("--workers", type=int, default=2)
    _spec_args(d)
    d.add_argument("--json", action="store_true", help="print one JSON object")
    d.add_argument("--keep", action="store_true", help="keep the demo's folder (logs, store)")
    d.add_argument("--no-serve", action="store_true", help="do not run an inference worker alongside")

    s = sub.add_parser("submit", help="submit a job; prints its id")
    _spec_args(s)
    s.add_argument("--wait", action="store_true")

    st = sub.add_parser("status", help="a job's state (or the list of jobs)")
    st.add_argument("job", nargs="?")
    st.add_argument("--json", action="store_true")

    w = sub.add_parser("wait", help="wait for a job to end")
    w.add_argument("job")
    w.add_argument("--timeout", type=float)

    ev = sub.add_parser("events", help="a job's event stream: retries, rejections, relaunches, failures")
    ev.add_argument("job")
    ev.add_argument("--count", type=int, default=100, help="newest N events (default 100)")
    ev.add_argument("--json", action="store_true", help="one JSON object per line")

    c = sub.add_parser("cancel", help="cancel a job")
    c.add_argument("job")

    r = sub.add_parser("resume", help="re-enqueue a job from its last committed version")
    r.add_argument("job")

    for mod in ("pipeline.client.cli_models", "pipeline.client.cli_ops"):
        try:
            module = __import__(mod, fromlist=["register_cli"])
        except ImportError:
            continue
        module.register_cli(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from pipeline.client import ServiceUnavailable
    from pipeline.spec import SpecError
    from storage.jobstate import JobNotFound

    try:
        return _dispatch(args)
    except (SpecError, ServiceUnavailable, JobNotFound, TimeoutError) as e:
        print(f"aas: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("aas: interrupted", file=sys.stderr)
        return 130


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
        return 0 if summary["status"] == "succeeded" else 1

    from pipeline.client import Client

    client = Client()
    if args.command == "submit":
        job_id = client.submit(_spec_from(args))
        print(job_id)
        if args.wait:
            final = client.wait(job_id)
            print(json.dumps({k: v for k, v in final.items() if k != "metrics"}))
        return 0
    if args.command == "status":
        if not args.job:
            rows = client.list()
            if args.json:
                print(json.dumps(rows))
                return 0
            if not rows:
                print("no jobs (aas submit, or aas demo)")
            for row in rows:
                acc = row.get("test_accuracy")
                print(f"{row['job_id']}  {row['status']:<10} v{row['version']}/{row['total_rounds']}"
                      + (f"  acc {acc:.4f}" if acc is not None else "") + _liveness_line(row["liveness"]))
            return 0
        st = client.status(args.job)
        if args.json:
            print(json.dumps(st))
        else:
            metrics = st.pop("metrics")
            st.pop("spec")
            live = st.pop("liveness")
            for k, v in st.items():
                print(f"{k:>14}: {v}")
            if live.get("since_progress_s") is not None:
                print(f"{'progress':>14}: {live['since_progress_s']:.0f} s ago")
            print(f"{'relaunches':>14}: {live.get('relaunches', 0)}")
            for t in live.get("tasks", []):
                print(f"{'task':>14}: {t['slot']} {t['what']} on {t['worker']} "
                      f"({time.time() - t['started']:.0f} s, {t['state'] if t['alive'] else 'lease LOST'})")
            if metrics:
                print(f"{'last version':>14}: {json.dumps(metrics[-1])}")
        return 0
    if args.command == "wait":
        final = client.wait(args.job, timeout=args.timeout)
        print(json.dumps({k: v for k, v in final.items() if k not in ("metrics", "spec")}))
        return 0 if final["status"] == "succeeded" else 1
    if args.command == "events":
        for e in client.events(args.job, count=args.count):
            if args.json:
                print(json.dumps(e))
                continue
            t = time.strftime("%H:%M:%S", time.localtime(float(e.get("t", 0))))
            rest = "  ".join(f"{k}={v}" for k, v in e.items() if k not in ("id", "t", "kind"))
            print(f"{t}  {e['kind']:<10} {rest}")
        return 0
    if args.command == "cancel":
        moved = client.cancel(args.job)
        print("cancelled" if moved else "already finished")
        return 0
    if args.command == "resume":
        print(json.dumps(client.resume(args.job)))
        return 0
    raise SystemExit(f"unknown command {args.command}")


if __name__ == "__main__":
    raise SystemExit(main())
