"""Benchmark: full checkpoints every K versions — what the aggregator saves, what a reader pays.

Two jobs of the same gpt (momentum SGD, 2 shards, fp32 updates written as the shard workers write them), one
checkpointing every version (K = 1), one every `--every` versions (recipes between: workers/rebuild.py). For
each, the real aggregation task (``workers.aggregator.aggregate_round``) runs `--rounds` rounds in this process,
as a running aggregator does (it holds each version it wrote); its own timings give the time per round and the
time spent writing the version (weights + momentum, fsync'd; or the recipe).

Then a process that holds nothing (a fresh Context: an aggregator after a restart, a late shard worker, the
evaluation task) reads versions of each job: of the K = 1 job, one checkpoint (weights + momentum); of the other,
the newest full checkpoint before it and every recipe after it, each blob read, verified, folded and stepped,
checked against the recipe's CRC. Bytes are the job's own count of bytes read; time is wall time; the files are
warm in the page cache (as after their write), so the reads are at memory speed, not disk speed.

    ops/bench/run rebuild [--params-m 25] [--rounds 8] [--every 8] [--json FILE]

Redis: AAS_REDIS_URL, else db 11 of the local server (flushed).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from ops.bench.aggregation import MB, context, settings_env, stage  # noqa: E402


def run_rounds(job: dict[str, Any], rounds: int) -> list[dict[str, Any]]:
    """Aggregate `rounds` rounds of the staged job in this process (one Context: a running aggregator)."""
    from workers.aggregator import aggregate_round

    ctx = context()
    out = []
    for v in range(rounds):
        commit = aggregate_round(ctx, job["job_id"], v, job["rounds"][v])
        assert commit.committed, f"round {v} of {job['job_id']} not committed"
        out.append(commit.metrics)
    return out


def read_version(job_id: str, version: int) -> dict[str, float]:
    """Version `version` as a process that holds nothing reads it: seconds and bytes."""
    from storage import keys

    ctx = context()
    before = ctx.jobs.get(job_id).num("bytes_down")
    t0 = time.perf_counter()
    ckpt = ctx.checkpoint(keys.checkpoint(job_id, version), job_id, with_opt=True)
    dt = time.perf_counter() - t0
    assert ckpt.version == version
    return {"s": dt, "bytes": ctx.jobs.get(job_id).num("bytes_down") - before}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params-m", type=float, default=25.0)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--every", type=int, default=8)
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    if a.rounds > a.every:
        raise SystemExit("--rounds must be at most --every (versions between two full checkpoints)")
    with tempfile.TemporaryDirectory(prefix="aas-bench-rebuild-") as d:
        os.environ.update(settings_env(Path(d)))
        jobs = {}
        for every in (1, a.every):
            job = stage(a.params_m, 2, rounds=a.rounds, spec={"checkpoint_every_versions": every},
                        flush=not jobs)
            job["metrics"] = run_rounds(job, a.rounds)
            jobs[every] = job
        model_mb = jobs[1]["model_mb"]
        rows = []
        for every, job in jobs.items():
            m = job["metrics"][1:]  # round 0 reads version 0 from the store
            reads = {v: read_version(job["job_id"], v) for v in sorted({1, a.rounds // 2, a.rounds - 1} - {0})}
            rows.append({"every": every, "round_s": statistics.median(x["round_s"] for x in m),
                         "write_s": statistics.median(x["write_s"] for x in m), "reads": reads})
    print(f"\ngpt {jobs[1]['params'] / 1e6:.1f}M parameters ({model_mb:.0f} MB fp32), 2 shards, fp32 updates, momentum "
          f"SGD; {a.rounds} rounds; medians over rounds 1..{a.rounds - 1}\n")
    print("| checkpoint every | aggregator round s | of which the version's write s | version read by a process "
          "holding nothing: s (MB read) |")
    print("|---:|---:|---:|---|")
    for r in rows:
        reads = ", ".join(f"v{v}: {x['s']:.2f} s ({x['bytes'] / MB:.0f} MB)" for v, x in r["reads"].items())
        print(f"| {r['every']} | {r['round_s']:.3f} | {r['write_s']:.3f} | {reads} |")
    base = rows[0]
    print(f"\nround time {rows[1]['round_s'] / base['round_s']:.2f}× K = 1's; write "
          f"{rows[1]['write_s'] / base['write_s']:.3f}× ")
    if a.json:
        Path(a.json).write_text(json.dumps({"params": jobs[1]["params"], "model_mb": model_mb, "rounds": a.rounds,
                                            "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
