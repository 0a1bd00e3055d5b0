"""A multi-host AaS fleet on one machine: every worker, the aggregator, Redis and S3 on their own network host.

    ops/fleet/run up     [--workers N] [--bandwidth 100mbit] [--link shard1=10mbit]   # until Ctrl-C
    ops/fleet/run job    [--workers N] [--bandwidth 20mbit] [--spec JSON] [--out FILE] [--weights FILE]
    ops/fleet/run faults [--bandwidth 20mbit] [--json FILE]       # a link down mid-round; a 10× slower link
    ops/fleet/run bench  [--bandwidths 100mbit,1gbit,20mbit] [--cap-s 400] [--json FILE] [--quick]

--bandwidth limits each shard worker's link (both directions; tc tbf); --link HOST=RATE sets one link.
Redis, S3, the aggregator and the client sit on unlimited links (a data centre's services). Needs root.
Everything is torn down at the end, on error, Ctrl-C or SIGTERM (`ip netns list` shows nothing of it).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from ops.fleet import netns
from ops.fleet.cluster import FleetCluster

DEFAULT_SPEC: dict[str, Any] = {"model": "digits-cnn", "dataset": "digits", "shards": 2, "batch_size": 64,
                                "epochs": 1, "lr": 0.05, "momentum": 0.9, "seed": 3, "publish_every_versions": 0,
                                "promote": None}


def parse_links(items: list[str]) -> dict[int, int]:
    out = {}
    for item in items:
        host, sep, rate = item.partition("=")
        if not sep or not host.startswith("shard") or not host[5:].isdigit():
            raise SystemExit(f"--link {item!r}: expected shardN=RATE, e.g. shard1=10mbit")
        out[int(host[5:])] = netns.rate_bits(rate)
    return out


def cluster_for(args: argparse.Namespace, workdir: Path) -> FleetCluster:
    bw = netns.rate_bits(args.bandwidth) if args.bandwidth else None
    return FleetCluster(workdir, workers=args.workers, bandwidth=bw, worker_rates=parse_links(args.link))


def final_state(client: Any, job_id: str) -> dict[str, Any]:
    from pipeline.checkpoint import decode_checkpoint
    from storage import keys

    v = client.jobs.get(job_id).version
    return decode_checkpoint(client.store.get(keys.checkpoint(job_id, v)), f"v{v}").state


def job_report(client: Any, job_id: str, t0: float) -> dict[str, Any]:
    """The job's end state and, per version, the identities of the blobs it consumed."""
    st = client.status(job_id)
    consumed = {v: sorted(client.jobs.consumed(job_id, v)) for v in range(1, st["version"] + 1)}
    return {"job_id": job_id, "status": st["status"], "error": st.get("error"), "version": st["version"],
            "total_rounds": st["total_rounds"], "wall_s": round(time.time() - t0, 2), "consumed": consumed,
            "metrics": st["metrics"][-1] if st["metrics"] else None}


def run_job(cluster: FleetCluster, spec: dict[str, Any], timeout_s: float,
            during: Any = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Submit, optionally call during(client, job_id) while it runs, wait; the report and final weights."""
    from pipeline.client import Client

    client = Client(cluster.settings)
    t0 = time.time()
    job_id = client.submit(spec)
    if during is not None:
        during(client, job_id)
    client.wait(job_id, timeout=timeout_s, poll_s=0.1)
    report = job_report(client, job_id, t0)
    return report, final_state(client, job_id) if report["status"] == "succeeded" else {}


def cmd_up(args: argparse.Namespace, workdir: Path) -> int:
    with cluster_for(args, workdir) as c:
        print(f"fleet up ({args.workers} shard workers); logs in {workdir / 'logs'}")
        for name, h in c.fleet.hosts.items():
            limit = netns.human_rate(h.rate_bits) if h.rate_bits else "unlimited"
            print(f"  {name:<8} {h.addr:<12} {c.fleet.ns(name):<22} {limit}")
        env_file = workdir / "client.env"  # the run's generated S3 key: in a file only root reads, never printed
        env_file.touch(mode=0o600)
        env_file.write_text("".join(f"export {k}={v}\n" for k, v in c.env.items() if k.startswith("AAS_")))
        print(f"client settings: {env_file} (AAS_REDIS_URL={c.settings.redis_url}, "
              f"AAS_S3_ENDPOINT={c.settings.s3_endpoint})\n"
              f"run a client with: ip netns exec {c.fleet.ns('ctl')} bash -c '. {env_file}; ops/aas ...'"
              "  (Ctrl-C tears it all down)", flush=True)
        while True:
            time.sleep(3600)


def cmd_job(args: argparse.Namespace, workdir: Path) -> int:
    spec = {**DEFAULT_SPEC, "shards": args.workers, **(json.loads(args.spec) if args.spec else {})}
    with cluster_for(args, workdir) as c:
        report, state = run_job(c, spec, args.timeout_s)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    if args.weights and state:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, args.weights)
    return 0 if report["status"] == "succeeded" else 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--workers", type=int, default=2)
    common.add_argument("--bandwidth", default=None, help="per shard worker link, e.g. 1gbit, 100mbit, 20mbit")
    common.add_argument("--link", action="append", default=[], help="one link's rate: shardN=RATE (repeatable)")
    common.add_argument("--workdir", default=None, help="logs and scratch (default: a temporary folder)")
    sub.add_parser("up", parents=[common], help="start the fleet and keep it up until Ctrl-C")
    j = sub.add_parser("job", parents=[common], help="run one job on a fresh fleet, print its report")
    j.add_argument("--spec", default=None, help="job spec overrides as JSON (default: digits-cnn, 1 epoch)")
    j.add_argument("--timeout-s", type=float, default=300)
    j.add_argument("--out", default=None, help="also write the report (JSON) here")
    j.add_argument("--weights", default=None, help="write the final weights (safetensors) here")
    f = sub.add_parser("faults", parents=[common], help="link-down and slow-link runs against a fault-free one")
    f.add_argument("--down-s", type=float, default=8.0)
    f.add_argument("--json", default=None)
    b = sub.add_parser("bench", help="DDP vs the pipeline's modes at several bandwidths")
    b.add_argument("--workers", type=int, default=2)
    b.add_argument("--bandwidths", default="100mbit,1gbit,20mbit")
    b.add_argument("--cap-s", type=float, default=400.0, help="stop a pipeline row after this long (s)")
    b.add_argument("--ddp-cap-s", type=float, default=45.0, help="stop a DDP or sync row after this long (s)")
    b.add_argument("--reference-ppl", type=float, default=None,
                   help="DDP's perplexity from an earlier run's reference (skips the one-process run)")
    b.add_argument("--rows", nargs="*", default=[],
                   help="only rows whose label starts with one of these; any 'DiLoCo H=<n>[ int8]' may be named")
    b.add_argument("--steps", type=int, default=None, help="steps per worker, every row (default 128: one epoch)")
    b.add_argument("--batch", type=int, default=None, help="samples per worker and step, every row (default 4)")
    b.add_argument("--outer-lr", type=float, default=None, help="DiLoCo rows' outer learning rate (default 0.7)")
    b.add_argument("--outer-momentum", type=float, default=None, help="DiLoCo rows' outer Nesterov momentum (0.9)")
    b.add_argument("--relaunch-grace-s", type=float, default=900.0,
                   help="the liveness monitor's grace for work neither queued nor leased (bench.py says why)")
    b.add_argument("--replay", choices=("on", "off", "both"), default="on",
                   help="shard workers build versions from the round's blobs (workers/replay.py); both: each "
                        "pipeline row again with it off")
    b.add_argument("--json", default=None)
    b.add_argument("--quick", action="store_true", help="a tiny model and 32 steps: checks the wiring only")
    b.add_argument("--workdir", default=None)
    args = ap.parse_args(argv)

    why = netns.available()
    if why:
        print(f"ops/fleet: cannot build a fleet here: {why}", file=sys.stderr)
        return 2
    netns.handle_signals()
    with tempfile.TemporaryDirectory(prefix="aas-fleet-") as tmp:
        workdir = Path(getattr(args, "workdir", None) or tmp)
        if args.cmd == "up":
            return cmd_up(args, workdir)
        if args.cmd == "job":
            return cmd_job(args, workdir)
        if args.cmd == "faults":
            from ops.fleet.faults import main as faults_main

            return faults_main(args, workdir)
        from ops.fleet.bench import main as bench_main

        return bench_main(args)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("ops/fleet: interrupted; fleet torn down", file=sys.stderr)
        sys.exit(130)
    finally:
        os.environ.pop("AAS_REDIS_URL", None)
