"""Benchmark: time per version of a small model against a no-op chord on the same workers.

The commit path's own cost shows on a model so small that compute is nothing: digits-cnn (38k
parameters), sync, 2 shards, real ``celery worker`` processes (2 shard workers, 1 aggregator) on an
embedded Redis and a local-folder store, as ``aas demo`` runs them. The floor is what Celery itself
costs per round on the same workers in the same run: a chord of 2 ``celery.accumulate`` tasks on the
``shards`` queue with a ``celery.accumulate`` body on the ``aggregate`` queue, sent back to back.

    ops/bench/run versions [--epochs 5] [--chords 100] [--spec JSON] [--json FILE]

Time per version is the median gap between consecutive commits (versions 5 onwards), and also the job's
wall time over its versions; the ratio to the chord's median is the figure. Beside it, the ratio to the chord
plus the shard tasks' own compute (their mean ``compute_s``, the gradient: work a no-op chord does not do).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from training import Cluster, shard_task_times  # ops/bench/training.py: the same processes and task records


def chord_floor(settings: Any, n: int) -> list[float]:
    from celery import chord, group

    from workers.app import QUEUE_AGGREGATE, QUEUE_SHARDS, app_for

    capp = app_for(settings)
    times = []
    for _ in range(n):
        header = group(capp.signature("celery.accumulate", args=(1,)).set(queue=QUEUE_SHARDS) for _ in range(2))
        body = capp.signature("celery.accumulate").set(queue=QUEUE_AGGREGATE)
        t0 = time.perf_counter()
        chord(header, app=capp)(body).get(timeout=30)
        times.append(time.perf_counter() - t0)
    return times


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--chords", type=int, default=100)
    ap.add_argument("--spec", default="{}",
                    help="JSON merged into the job spec (e.g. '{\"publish_every_versions\": 0}')")
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="aas-bench-versions-") as d, Cluster(Path(d), shards=2) as cluster:
        chord_floor(cluster.settings, 10)  # warm-up: connections, first task imports
        floor = chord_floor(cluster.settings, a.chords)
        spec = {"model": "digits-cnn", "shards": 2, "batch_size": 32, "epochs": a.epochs, "promote": None,
                **json.loads(a.spec)}
        from pipeline.client import Client

        client = Client(cluster.settings)
        t0 = time.perf_counter()
        job_id = client.submit(spec)
        final = client.wait(job_id, timeout=600, poll_s=0.05)
        wall = time.perf_counter() - t0
        compute_s, _, tasks = shard_task_times(client.redis, job_id)
        floor_after = chord_floor(cluster.settings, a.chords)  # the machine is shared: measure on both sides
    metrics = final["metrics"]
    stamps = [m["t"] for m in metrics]
    gaps = [b - c for c, b in zip(stamps[4:], stamps[5:], strict=False)]
    chord_ms = 1e3 * statistics.median(floor + floor_after)
    row = {
        "versions": final["version"], "status": final["status"], "test_accuracy": final.get("test_accuracy"),
        "version_ms_median": 1e3 * statistics.median(gaps), "version_ms_mean": 1e3 * (stamps[-1] - stamps[4]) /
        max(1, len(stamps) - 5), "job_wall_s": wall, "chord_ms_median": chord_ms,
        "chord_ms_before": 1e3 * statistics.median(floor), "chord_ms_after": 1e3 * statistics.median(floor_after),
        "round_s_median": statistics.median(m["round_s"] for m in metrics),
        "fold_ms_median": 1e3 * statistics.median(m["fold_s"] for m in metrics),
        "write_ms_median": 1e3 * statistics.median(m["write_s"] for m in metrics),
    }
    row["shard_compute_ms_mean"] = 1e3 * compute_s / max(1, tasks)
    row["ratio_median"] = row["version_ms_median"] / chord_ms
    row["ratio_to_chord_and_compute"] = row["version_ms_median"] / (chord_ms + row["shard_compute_ms_mean"])
    row["ratio_mean"] = row["version_ms_mean"] / chord_ms
    print("| versions | accuracy | ms/version median (mean) | no-op chord ms median (before / after) "
          "| ratio median (mean) | shard compute ms | ratio to chord + compute "
          "| aggregator round ms: fold / write / all |")
    print("|---:|---:|---|---|---|---:|---:|---|")
    print(f"| {row['versions']} | {row['test_accuracy']:.4f} | {row['version_ms_median']:.1f} "
          f"({row['version_ms_mean']:.1f}) | {chord_ms:.1f} ({row['chord_ms_before']:.1f} / "
          f"{row['chord_ms_after']:.1f}) | {row['ratio_median']:.2f}× ({row['ratio_mean']:.2f}×) | "
          f"{row['shard_compute_ms_mean']:.1f} | {row['ratio_to_chord_and_compute']:.2f}× | "
          f"{row['fold_ms_median']:.1f} / {row['write_ms_median']:.1f} / {1e3 * row['round_s_median']:.1f} |")
    if a.json:
        Path(a.json).write_text(json.dumps(row, indent=1))
    return 0 if final["status"] == "succeeded" else 2


if __name__ == "__main__":
    sys.exit(main())
