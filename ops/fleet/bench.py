"""Benchmark over slow links: DDP (gloo) against the pipeline's modes, each worker on its own limited link.

For each bandwidth (per worker link, both directions), on one fleet (ops/fleet/cluster.py) whose links
are re-limited between bandwidths:

    ddp           DDP, gloo, one rank per worker host, AdamW                      ┐ the same model, data,
    sync          the pipeline, sync rounds (SGD with momentum)                   │ initialisation and
    H=8|32|128    DiLoCo: AdamW inner steps, Nesterov outer step, fp32 Δ          │ mini-batches in every
    H=… int8      the same with the outer gradient (Δ) int8-coded                 ┘ row

Each row trains the workload's steps per worker, or stops after `--cap-s` seconds (rows bound by the
network at low bandwidth would take hours); a stopped row reports the rate of what it committed and no
perplexity. DDP's perplexity is that of one process running DDP's math (AdamW on the union of each
step's batches, ``reference_adamw``), measured once: it does not depend on the link.

    samples/s      samples committed (pipeline) or stepped (DDP) / wall time from submit (from the first step for DDP)
    compute %      time spent in forward/backward/optimizer steps / (wall × workers): shard tasks' own
                   compute_s (pipeline), or steps × a calibrated no-all-reduce step time (DDP)
    steady %       the pipeline's compute share between its first and its last commit: whole rounds
                   (download, H steps, upload, aggregate, commit) without staging, the first download of
                   version 0 and the last aggregation; "—" with a single round
    bytes/sample   bytes on the wire through the worker links / samples, each byte counted once: both
                   directions for the pipeline (worker ↔ Redis/S3), what the ranks sent for DDP (rank ↔ rank)

    ops/fleet/run bench [--bandwidths 100mbit,1gbit,20mbit] [--cap-s 400] [--ddp-cap-s 45] [--json FILE] [--quick]
                        [--rows LABEL ...] [--steps N] [--batch B] [--outer-lr LR] [--outer-momentum M]
                        [--replay on|off|both]
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
import traceback
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ops.fleet.cluster import FleetCluster
from ops.fleet.netns import human_rate, rate_bits
from ops.fleet.workload import Workload, reference_adamw

PPL_TOLERANCE = 0.02  # "≤ 2% worse perplexity"


@dataclass(frozen=True)
class Row:
    label: str
    kind: str  # "ddp" | "pipeline"
    local_steps: int = 1
    codec: str = "none"


ROWS = [Row("DDP gloo", "ddp"), Row("pipeline sync", "pipeline")] + [
    Row(f"DiLoCo H={h}" + (" int8" if codec != "none" else ""), "pipeline", h, codec)
    for h in (128, 32, 8) for codec in ("int8", "none")]  # the likeliest winners first: a short run has them


def parse_row(label: str) -> Row | None:
    """A row named on the command line: one of ROWS by label, or any ``DiLoCo H=<n>[ int8]``."""
    m = re.fullmatch(r"DiLoCo H=(\d+)( int8)?", label.strip())
    if m is None or int(m.group(1)) < 2:
        return None
    return Row(label.strip(), "pipeline", int(m.group(1)), "int8" if m.group(2) else "none")


def select_rows(wanted: list[str]) -> list[Row]:
    """ROWS whose label is or starts with one of `wanted`, then any other DiLoCo H=<n> asked for; all if none."""
    if not wanted:
        return list(ROWS)
    out = [r for r in ROWS if any(r.label == k or r.label.startswith(k) for k in wanted)]
    for k in wanted:
        row = parse_row(k)
        if row is not None and all(r.label != row.label for r in out):
            out.append(row)
        elif row is None and not any(r.label.startswith(k) for r in ROWS):
            raise SystemExit(f"--rows {k!r}: no such row (known: {', '.join(r.label for r in ROWS)}, "
                             "or any 'DiLoCo H=<n>[ int8]')")
    return out


def compute_shares(tasks: list[tuple[int, float]], commits: list[float], submitted: float, ended: float,
                   workers: int) -> tuple[float, float | None]:
    """Compute share of a pipeline job, whole-job and steady-state.

    `tasks`: (base version, compute_s) of each shard task whose version was committed; `commits`: the wall
    time (epoch s) at which versions 1..N were committed. Whole job: Σ compute / ((ended − submitted) ×
    workers), staging, the first download and the last aggregation included. Steady state: the rounds
    between the first and the last commit, (t_N − t_1) × workers against the compute of the tasks on
    versions 1..N−1 (each such round: download v_k, H steps, upload Δ, aggregate, commit v_k+1); None
    with fewer than two versions.
    """
    whole = sum(c for _, c in tasks) / ((ended - submitted) * workers)
    if len(commits) < 2:
        return whole, None
    steady = sum(c for v, c in tasks if 1 <= v < len(commits))
    return whole, steady / ((commits[-1] - commits[0]) * workers)


def shard_task_compute(r: Any, job_id: str, below_version: int) -> list[tuple[int, float]]:
    """(version, compute_s) of this job's shard tasks on versions < `below_version` (those that were committed)."""
    from storage.leases import shard_results

    return [(int(res["version"]), float(res["compute_s"])) for res in shard_results(r, job_id)
            if "compute_s" in res and 0 <= int(res.get("version", -1)) < below_version]


def wait_idle(cluster: FleetCluster, timeout_s: float = 180.0) -> None:
    """Drop queued work and wait until no worker runs a task (a stopped row's last tasks finish)."""
    from workers.app import app_for

    app = app_for(cluster.settings)
    app.control.purge()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        active = app.control.inspect(timeout=1.0).active() or {}
        if not any(active.values()):
            return
        time.sleep(1.0)


def run_pipeline(cluster: FleetCluster, w: Workload, row: Row, cap_s: float) -> dict[str, Any]:
    from pipeline.client import Client
    from storage.jobstate import TERMINAL

    client = Client(cluster.settings)
    b0 = cluster.worker_link_bytes()
    t0 = time.time()
    job_id = client.submit(w.spec(local_steps=row.local_steps, codec=row.codec))
    capped = False
    while True:
        state = client.jobs.get(job_id)
        if state.status in TERMINAL:
            break
        if time.time() - t0 > cap_s:
            capped = True
            client.cancel(job_id)
            break
        time.sleep(0.25)
    moved = cluster.worker_link_bytes() - b0
    final = client.status(job_id)
    if final["status"] == "failed":
        raise RuntimeError(f"job {job_id} failed: {final.get('error')}")
    metrics = final["metrics"]
    if not metrics:
        raise RuntimeError(f"job {job_id}: no version committed within {cap_s:g} s")
    samples = sum(int(m.get("samples", 0)) for m in metrics)
    end = float(final.get("finished_at", metrics[-1]["t"])) if not capped else float(metrics[-1]["t"])
    wall = end - t0
    tasks = shard_task_compute(client.redis, job_id, below_version=len(metrics))
    commits = [float(m["t"]) for m in metrics]
    compute, steady = compute_shares(tasks, commits, t0, end, w.workers)
    done = not capped and final["status"] == "succeeded"
    if capped:
        wait_idle(cluster)
    return {"samples": samples, "wall_s": wall, "compute": compute, "compute_steady": steady, "bytes": moved,
            "perplexity": metrics[-1].get("perplexity") if done else None, "complete": done,
            "versions": len(metrics), "steps": samples // (w.batch * w.workers), "tasks": len(tasks),
            "round_s": [m.get("round_s") for m in metrics], "commit_t": [round(t - t0, 2) for t in commits]}


_ddp_runs = 0


def run_rows(cluster: FleetCluster, args: Any, w: Workload, bandwidths: list[int], rows: list[Row], workdir: Path,
             results: list[dict[str, Any]], *, replay: bool, save: Any) -> None:
    """Run `rows` at every bandwidth on the fleet, appending to `results` (" (replay off)" after a label whose
    shard workers download every version)."""
    suffix = "" if replay else " (replay off)"
    for bw in bandwidths:
        cluster.set_bandwidth(bw)
        for row in rows:
            # DDP and sync rounds move the whole model every step: at these rates they are bound by the link,
            # and a short run gives their steady rate.
            cap = args.ddp_cap_s if row.local_steps == 1 else args.cap_s
            t0 = time.perf_counter()
            print(f"[fleet-bench] {human_rate(bw)} {row.label}{suffix} ...", file=sys.stderr, flush=True)
            entry: dict[str, Any] = {"bandwidth": bw, "label": row.label + suffix, "kind": row.kind,
                                     "local_steps": row.local_steps, "codec": row.codec, "cap_s": cap,
                                     "replay": replay}
            try:
                entry.update(run_row(cluster, w, row, cap, workdir))
            except Exception as e:  # noqa: BLE001 - a failing row is reported; the others still run
                traceback.print_exc(file=sys.stderr)
                entry["error"] = f"{type(e).__name__}: {e}".splitlines()[0][:200]
                wait_idle(cluster)
            results.append(entry)
            print(f"[fleet-bench]   done in {time.perf_counter() - t0:.0f} s: "
                  f"{ {k: entry.get(k) for k in ('samples', 'wall_s', 'compute', 'perplexity', 'error')} }",
                  file=sys.stderr, flush=True)
            save()


def run_ddp(cluster: FleetCluster, w: Workload, cap_s: float, workdir: Path) -> dict[str, Any]:
    global _ddp_runs
    _ddp_runs += 1
    out = workdir / f"ddp{_ddp_runs}.json"
    master = f"{cluster.fleet.addr('shard0')}:{29500 + _ddp_runs}"
    b0 = cluster.worker_link_bytes(sent_only=True)
    procs = [cluster.start_in(h, f"ddp{_ddp_runs}-r{r}", [
        sys.executable, "-m", "ops.fleet.ddp_rank", "--rank", str(r), "--master", master,
        "--workload", json.dumps(w.to_dict()), "--cap-s", str(cap_s), "--out", str(out)])
        for r, h in enumerate(cluster.shard_hosts)]
    deadline = time.monotonic() + cap_s + 600
    for p in procs:
        rc = p.wait(timeout=max(1.0, deadline - time.monotonic()))
        if rc != 0:
            raise RuntimeError(f"DDP rank exited {rc}: see {cluster.workdir / 'logs'}")
    res = json.loads(out.read_text())
    return {**res, "bytes": cluster.worker_link_bytes(sent_only=True) - b0}


def run_row(cluster: FleetCluster, w: Workload, row: Row, cap_s: float, workdir: Path) -> dict[str, Any]:
    if row.kind == "ddp":
        return run_ddp(cluster, w, cap_s, workdir)
    return run_pipeline(cluster, w, row, cap_s)


def fmt(v: float | None, spec: str) -> str:
    return "—" if v is None else format(v, spec)


def pct(v: float | None) -> str:
    return "—" if v is None else f"{100 * v:.0f}"


def markdown(results: list[dict[str, Any]], ddp_ppl: float) -> str:
    lines = ["| link per worker | setup | samples/s | × DDP | compute % | steady % | bytes/sample | test ppl "
             "| Δ ppl vs DDP | steps/worker | notes |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for bw in dict.fromkeys(r["bandwidth"] for r in results):
        rows = [r for r in results if r["bandwidth"] == bw]
        ddp = next((r for r in rows if r["kind"] == "ddp" and "error" not in r), None)
        ddp_rate = ddp["samples"] / ddp["wall_s"] if ddp else None
        for r in rows:
            if "error" in r:
                lines.append(f"| {human_rate(bw)} | {r['label']} | error: {r['error']} | | | | | | | | |")
                continue
            rate = r["samples"] / r["wall_s"]
            ppl = r.get("perplexity")
            note = "" if r.get("complete") else f"stopped at the {r['cap_s']:g} s cap"
            if r["kind"] == "ddp" and ppl is None:
                ppl, note = ddp_ppl, (note + "; " if note else "") + "ppl: DDP's math in one process"
            delta = None if ppl is None else 100 * (ppl / ddp_ppl - 1)
            lines.append(
                f"| {human_rate(bw)} | {r['label']} | {rate:.1f} | {fmt(rate / ddp_rate if ddp_rate else None, '.2f')}"
                f" | {100 * r['compute']:.0f} | {pct(r.get('compute_steady'))}"
                f" | {r['bytes'] / max(1, r['samples']) / 1e3:,.1f} kB | {fmt(ppl, '.2f')}"
                f" | {fmt(delta, '+.1f') + ('%' if delta is not None else '')} | {r.get('steps', '—')} | {note} |")
    return "\n".join(lines)


def verdicts(results: list[dict[str, Any]], ddp_ppl: float) -> list[str]:
    """The issue's targets, each part met or missed, for every pipeline mode that finished (fastest first)."""
    out = []
    for bw, want_x, check_quality in ((100_000_000, 3.0, True), (1_000_000_000, 1.0, False)):
        rows = [r for r in results if r["bandwidth"] == bw and "error" not in r]
        ddp = next((r for r in rows if r["kind"] == "ddp"), None)
        done = [r for r in rows if r["kind"] == "pipeline" and r.get("perplexity") is not None]
        if ddp is None or not done:
            out.append(f"{human_rate(bw)}: not measured")
            continue
        ddp_rate = ddp["samples"] / ddp["wall_s"]
        for r in sorted(done, key=lambda r: -r["samples"] / r["wall_s"]):
            x = r["samples"] / r["wall_s"] / ddp_rate
            worse = r["perplexity"] / ddp_ppl - 1
            parts = [f"{x:.2f}× DDP's samples/s (≥ {want_x:g}×: {'met' if x >= want_x else 'MISSED'})"]
            if check_quality:
                parts.append(f"perplexity {100 * worse:+.1f}% vs DDP (≤ +{100 * PPL_TOLERANCE:g}%: "
                             f"{'met' if worse <= PPL_TOLERANCE else 'MISSED'})")
                ok = r["compute"] >= 0.9
                steady = r.get("compute_steady")
                parts.append(f"compute {100 * r['compute']:.0f}% whole job (≥ 90%: {'met' if ok else 'MISSED'})"
                             + ("" if steady is None else f", {100 * steady:.0f}% between first and last commit"))
            else:
                parts.append(f"perplexity {100 * worse:+.1f}% vs DDP")
            out.append(f"{human_rate(bw)}, {r['label']}: " + ", ".join(parts))
    return out


def workload_for(args: Any) -> Workload:
    """The workload of a run: the defaults, --quick's tiny model, then any budget or outer-optimizer override."""
    w = Workload(workers=args.workers)
    if args.quick:
        w = replace(w, steps=32, n_embd=128, n_layer=2, n_head=4)
    given = {"steps": args.steps, "batch": args.batch, "outer_lr": args.outer_lr,
             "outer_momentum": args.outer_momentum}
    return replace(w, **{k: v for k, v in given.items() if v is not None})


def main(args: Any) -> int:
    w = workload_for(args)
    bandwidths = [rate_bits(b) for b in args.bandwidths.split(",")]
    only = select_rows(args.rows)
    workdir = Path(args.workdir or f"/tmp/aas-fleet-bench-{os.getpid()}")
    workdir.mkdir(parents=True, exist_ok=True)
    results: list[dict[str, Any]] = []
    t_start = time.perf_counter()

    def save(extra: dict[str, Any]) -> None:
        if args.json:
            Path(args.json).write_text(json.dumps({"workload": w.to_dict(), "cpus": os.cpu_count(),
                                                   "results": results, **extra}, indent=2, default=str))

    # The liveness monitor relaunches a shard slot that is "neither done, queued nor leased" after
    # relaunch_grace_s (2 s by default). A shard task that a busy worker has taken from the queue but not started
    # is neither (kombu keeps it unacked, the lease begins when it runs), so a DiLoCo round, whose tasks run for
    # minutes, got the same task relaunched every few seconds and the workers ran stale duplicates for
    # minutes. Lost leases (a worker that died) are still relaunched at once.
    env = {"AAS_RELAUNCH_GRACE_S": str(args.relaunch_grace_s)}
    print("[fleet-bench] reference (DDP's math, one process) ...", file=sys.stderr, flush=True)
    ref = {"perplexity": args.reference_ppl, "given": True} if args.reference_ppl else reference_adamw(w)
    ddp_ppl = float(ref["perplexity"])
    print(f"[fleet-bench] reference ppl {ddp_ppl:.3f} in {ref.get('wall_s', 0):.0f} s", file=sys.stderr, flush=True)
    # Shard workers build each version from the round's blobs where that moves fewer bytes (workers/replay.py);
    # "--replay both" runs every pipeline row again on a fleet started with it off, for the side-by-side.
    variants = {"on": [True], "off": [False], "both": [True, False]}[args.replay]
    env = {**env, "AAS_REPLAY_VERSIONS": "true" if variants[0] else "false"}
    with FleetCluster(workdir, workers=w.workers, bandwidth=bandwidths[0], extra_env=env) as cluster:
        print(f"[fleet-bench] fleet up: {w.workers} workers", file=sys.stderr, flush=True)
        for replay in variants:
            if replay != variants[0]:
                cluster.restart_workers({"AAS_REPLAY_VERSIONS": "true" if replay else "false"})
            rows = [r for r in only if r.kind == "pipeline" or replay == variants[0]]  # DDP once
            run_rows(cluster, args, w, bandwidths, rows, workdir, results, replay=replay,
                     save=lambda: save({"reference": ref}))
    table = markdown(results, ddp_ppl)
    notes = verdicts(results, ddp_ppl)
    print(f"\nchar-lm {w.n_embd}×{w.n_layer} ({'quick' if args.quick else '≥10M parameters'}), {w.workers} workers × "
          f"batch {w.batch} × block {w.block_size}, {w.steps} steps per worker; {os.cpu_count()} CPUs\n")
    print(table)
    print("\n" + "\n".join(notes))
    print(f"\ntotal {time.perf_counter() - t_start:.0f} s")
    save({"reference": ref, "table": table, "targets": notes})
    return 0 if all("error" not in r for r in results) else 1
