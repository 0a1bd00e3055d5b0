"""Faults between hosts: a worker's link goes down mid-round and comes back; a worker's link is 10× slower.

Three sync runs of the same job on one fleet: fault-free, link down, slow link. Sync mode's final weights
do not depend on faults (DESIGN.md, "Exactly once"), so each faulty run must end on the fault-free run's
version with the same weights (to 1e-6), and every version must have consumed exactly one blob per shard.

    ops/fleet/run faults [--bandwidth 20mbit] [--down-s 8] [--json FILE]
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

from ops.fleet.cluster import FleetCluster
from ops.fleet.netns import human_rate, rate_bits

# A small char-lm (≈0.1M parameters, 0.4 MB a blob) so a 10× slower link still finishes in seconds a round.
SPEC: dict[str, Any] = {"model": "char-lm", "model_args": {"n_embd": 64, "n_layer": 2, "n_head": 4},
                        "dataset": "chars", "dataset_args": {"block_size": 64, "max_chars": 40_000},
                        "shards": 2, "batch_size": 32, "epochs": 1, "lr": 0.1, "momentum": 0.9, "seed": 11,
                        "publish_every_versions": 0, "promote": None}
FAULTY_WORKER = 1


def max_abs_diff(a: dict[str, Any], b: dict[str, Any]) -> float:
    if a.keys() != b.keys():
        return float("inf")
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def check_consumed(report: dict[str, Any], shards: int) -> str | None:
    """None when every version consumed exactly one blob of every shard, else what is wrong."""
    from storage import keys

    for v, idents in report["consumed"].items():
        got = sorted(keys.parse_identity(i).shard for i in idents)
        if got != list(range(shards)):
            return f"version {v} consumed shards {got}"
    return None


def link_down_during(cluster: FleetCluster, host: str, down_s: float, at_version: int,
                     log: dict[str, Any]) -> Any:
    """A `during` hook: once the job reaches `at_version`, take the host's link down for `down_s`, then up."""

    def hook(client: Any, job_id: str) -> None:
        def flap() -> None:
            deadline = time.monotonic() + 300
            while client.jobs.get(job_id).version < at_version and time.monotonic() < deadline:
                time.sleep(0.05)
            log["down_at_version"] = client.jobs.get(job_id).version
            cluster.fleet.set_link(host, up=False)
            time.sleep(down_s)
            log["up_at_version"] = client.jobs.get(job_id).version
            cluster.fleet.set_link(host, up=True)

        # A thread so the caller's wait() runs meanwhile; it opens sockets from the ctl namespace, where the
        # main thread already is (threads inherit the namespace of the thread that starts them).
        t = threading.Thread(target=flap, daemon=True)
        t.start()
        log["thread"] = t

    return hook


def main(args: Any, workdir: Path) -> int:
    from ops.fleet.fleet import run_job

    bw = rate_bits(args.bandwidth or "20mbit")
    spec = {**SPEC, "shards": args.workers}
    host = f"shard{FAULTY_WORKER}"
    rows: list[dict[str, Any]] = []
    # A lost message is relaunched by the watchdog within seconds instead of after the 15-minute default.
    env = {"AAS_WATCHDOG_STALL_S": "30", "AAS_WATCHDOG_INTERVAL_S": "5"}
    with FleetCluster(workdir, workers=args.workers, bandwidth=bw, extra_env=env) as cluster:
        clean, ref = run_job(cluster, spec, 600)
        rows.append({"run": "fault-free", **summary(clean, ref, ref, args.workers)})

        log: dict[str, Any] = {}
        down, w_down = run_job(cluster, spec, 600, during=link_down_during(cluster, host, args.down_s, 2, log))
        log.pop("thread").join(timeout=60)
        cluster.fleet.set_link(host, up=True)
        rows.append({"run": f"{host} link down {args.down_s:g} s mid-job (at v{log.get('down_at_version')}, "
                            f"back at v{log.get('up_at_version')})", **summary(down, w_down, ref, args.workers)})

        cluster.fleet.set_rate(host, bw // 10)
        slow, w_slow = run_job(cluster, spec, 900)
        cluster.fleet.set_rate(host, bw)
        rows.append({"run": f"{host} link 10× slower ({human_rate(bw // 10)})", **summary(slow, w_slow, ref,
                                                                                          args.workers)})
    print(f"\nsync job, {args.workers} workers, links {human_rate(bw)}\n")
    print("| run | status | versions | wall s | one blob per shard per version | max |Δw| vs fault-free |")
    print("|---|---|---:|---:|---|---:|")
    for r in rows:
        print(f"| {r['run']} | {r['status']} | {r['version']} | {r['wall_s']:.1f} | {r['consumed_ok']} | "
              f"{r['max_abs_diff']:.1e} |")
    ok = all(r["status"] == "succeeded" and r["consumed_ok"] == "yes" and r["max_abs_diff"] <= 1e-6
             and r["version"] == rows[0]["version"] for r in rows)
    print("\nnothing lost, nothing applied twice, same weights: " + ("yes" if ok else "NO"))
    if args.json:
        Path(args.json).write_text(json.dumps({"bandwidth": bw, "rows": rows, "ok": ok}, indent=2))
    return 0 if ok else 1


def summary(report: dict[str, Any], state: dict[str, Any], ref: dict[str, Any], shards: int) -> dict[str, Any]:
    problem = check_consumed(report, shards)
    return {"status": report["status"], "version": report["version"], "wall_s": report["wall_s"],
            "consumed_ok": "yes" if problem is None else problem,
            "max_abs_diff": max_abs_diff(state, ref) if state else float("inf")}
