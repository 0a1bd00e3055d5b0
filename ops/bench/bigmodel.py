"""Benchmark: a big gpt through real worker processes, with each process's peak memory.

A real job (sync, 2 rounds) on an embedded Redis (or AAS_REDIS_URL, e.g. the machine's Redis db 7) and a
local-folder store, with `--workers` real ``celery worker`` shard processes and one aggregator process,
as ``aas demo`` starts them. The data set is sized so the job is exactly `--rounds` rounds. Reports each
process's peak RSS (VmHWM from /proc, read before it is stopped; the bench process itself stages the
job: it builds, initialises and encodes version 0), the time of every round, and the fp32 model size.

A guard samples MemAvailable every second and stops everything (exit 2) if it falls below --min-free-gb:
the machine is shared, and a process that does not fit must not take it down.

    ops/bench/run bigmodel [--size 100m] [--workers 2] [--rounds 2] [--json FILE]
    ops/bench/run bigmodel --size 1b --workers 1 --no-aggregator   # the shard side alone (round 0's tasks)
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
GB = 1e9


def mem_available_gb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024 / GB
    return float("nan")


def peak_rss_gb(pid: int) -> float | None:
    """VmHWM: the process's peak resident set, in GB (None once it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) * 1024 / GB, 2)
    except OSError:
        return None
    return None


class Guard(threading.Thread):
    """Stops the run when the machine runs low on memory; records the lowest MemAvailable seen."""

    def __init__(self, min_free_gb: float, on_low: Any) -> None:
        super().__init__(daemon=True, name="mem-guard")
        self.min_free_gb, self.on_low = min_free_gb, on_low
        self.lowest = mem_available_gb()
        self.tripped = False
        self._stop = threading.Event()

    def run(self) -> None:
        while not self._stop.wait(1.0):
            free = mem_available_gb()
            self.lowest = min(self.lowest, free)
            if free < self.min_free_gb and not self.tripped:
                self.tripped = True
                print(f"[bigmodel] MemAvailable {free:.1f} GB < {self.min_free_gb} GB: stopping everything",
                      file=sys.stderr, flush=True)
                self.on_low()

    def stop(self) -> None:
        self._stop.set()


def job_spec(size: str, shards: int, rounds: int, batch: int, block: int) -> dict[str, Any]:
    """A chars job of exactly `rounds` sync rounds: each shard holds rounds × batch windows."""
    n_test = 2
    n_train = shards * rounds * batch
    windows = n_train + n_test
    assert n_test == max(1, min(n_test, windows // 5)), "the loader's test split would differ"
    return {"model": "gpt", "model_args": {"size": size, "block_size": block}, "dataset": "chars",
            "dataset_args": {"block_size": block, "max_chars": windows * block + 1, "test_windows": n_test},
            "shards": shards, "batch_size": batch, "epochs": 1, "lr": 0.01, "momentum": 0.9,
            # The final version is registered as plain fp32 safetensors: zstd gains ~7% on fp32 weights and
            # needs the whole artifact in memory once more to compress it.
            "publish_every_versions": 0, "promote": None, "artifact_chain": "none"}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="100m", help="gpt size (1m, 10m, 100m, 1b)")
    ap.add_argument("--workers", type=int, default=2, help="shard worker processes")
    ap.add_argument("--shards", type=int, default=0, help="data shards per round (default: one per worker)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=2, help="sequences per shard and round")
    ap.add_argument("--block-size", type=int, default=64, help="tokens per sequence")
    ap.add_argument("--no-aggregator", action="store_true",
                    help="start no aggregator: measure round 0's shard tasks alone, then stop")
    ap.add_argument("--min-free-gb", type=float, default=3.0, help="stop everything below this MemAvailable")
    ap.add_argument("--spec", default="{}", help="JSON fields added to the job's spec, e.g. "
                    "'{\"checkpoint_every_versions\": 8}' or '{\"aggregation_parts\": 2}'")
    ap.add_argument("--timeout-s", type=float, default=1800.0)
    ap.add_argument("--json", help="write the report here")
    a = ap.parse_args(argv)

    workdir = Path(tempfile.mkdtemp(prefix="aas-bigmodel-"))
    env = dict(os.environ)
    env.setdefault("AAS_VISIBILITY_TIMEOUT_S", "7200")  # a 1b task is minutes on 2 cores: never redeliver it
    env.setdefault("AAS_TASK_TIME_LIMIT_S", "3600")
    env.setdefault("AAS_WATCHDOG_INTERVAL_S", "0")
    env["AAS_STORE_ROOT"] = str(workdir / "store")
    env.setdefault("AAS_SIGNING_KEY", secrets.token_hex(32))  # a per-run key: blobs are signed and checked
    env.setdefault("AAS_MAX_BLOB_BYTES", str(16 << 30))  # a 1b fp32 update is 4 GB, above the default limit
    env["PYTHONPATH"] = str(REPO)
    embedded = group = None
    report: dict[str, Any] = {"size": a.size, "shard_workers": a.workers, "rounds": a.rounds,
                              "aggregator": not a.no_aggregator, "mem_available_start_gb": round(mem_available_gb(), 1)}
    guard = None
    try:
        from pipeline.client.processes import EmbeddedRedis, ProcessGroup, wait_for_workers

        if not env.get("AAS_REDIS_URL"):
            embedded = EmbeddedRedis(workdir / "redis")
            env["AAS_REDIS_URL"] = embedded.url
        os.environ.update({k: v for k, v in env.items() if k.startswith("AAS_")})
        from pipeline.client import Client
        from pipeline.models.gpt import config_for
        from pipeline.settings import get_settings
        from storage import keys
        from workers.app import app_for

        get_settings.cache_clear()
        settings = get_settings()
        spec = {**job_spec(a.size, a.shards or a.workers, a.rounds, a.batch_size, a.block_size), **json.loads(a.spec)}
        n_params = config_for(**spec["model_args"]).n_params()
        report.update(params=n_params, model_fp32_gb=round(4 * n_params / GB, 3), spec=spec)
        print(f"[bigmodel] gpt {a.size}: {n_params / 1e6:.1f}M parameters, {4 * n_params / GB:.2f} GB fp32; "
              f"{a.workers} shard workers, {'no' if a.no_aggregator else '1'} aggregator; MemAvailable "
              f"{report['mem_available_start_gb']} GB", flush=True)

        group = ProcessGroup(env=env, cwd=REPO, logdir=workdir / "logs")
        guard = Guard(a.min_free_gb, lambda: group.close(grace_s=1.0))
        guard.start()
        names = [f"shard{i}" for i in range(a.workers)]
        for n in names:
            group.start_worker(n, "shards")
        if not a.no_aggregator:
            group.start_worker("aggregator", "aggregate")
            names.append("aggregator")
        wait_for_workers(app_for(settings), names, timeout_s=180)
        pids = {n: p.pid for n, p in group.procs.items()}

        client = Client(settings)
        t0 = time.monotonic()
        job_id = client.submit(spec)  # stages here: builds, initialises and encodes version 0
        t_staged = time.time()
        report["submit_s"] = round(time.monotonic() - t0, 1)
        report["bench_process_peak_rss_gb"] = peak_rss_gb(os.getpid())
        total = client.jobs.get(job_id).total_rounds
        if total != a.rounds:
            raise RuntimeError(f"the job has {total} rounds, not {a.rounds}")
        print(f"[bigmodel] job {job_id} staged in {report['submit_s']} s "
              f"(this process's peak RSS {report['bench_process_peak_rss_gb']} GB)", flush=True)

        deadline = time.monotonic() + a.timeout_s
        status: dict[str, Any] = {}
        while time.monotonic() < deadline and not guard.tripped:
            if a.no_aggregator:
                n = a.shards or a.workers
                done = [s for s in range(n) if any(client.store.list(keys.gradient_attempts(job_id, 0, s)))]
                if len(done) == n:
                    break
            else:
                status = client.status(job_id)
                if status["status"] in ("succeeded", "failed", "cancelled"):
                    break
            time.sleep(1.0)
        report["wall_s"] = round(time.monotonic() - t0, 1)
        report["peak_rss_gb"] = {n: peak_rss_gb(pid) for n, pid in pids.items()}
        report["peak_rss_gb"]["bench (client, staging)"] = peak_rss_gb(os.getpid())
        report["mem_available_lowest_gb"] = round(guard.lowest, 1)
        if guard.tripped:
            report["outcome"] = "stopped: the machine ran low on memory"
        elif a.no_aggregator:
            report["outcome"] = "round 0's shard tasks done" if time.monotonic() < deadline else "timed out"
        else:
            report["outcome"] = status.get("status", "timed out")
            metrics = status.get("metrics") or []
            prev = t_staged
            rounds = []
            for m in metrics:
                rounds.append({"round_s": round(m["t"] - prev, 1), "aggregator_s": m.get("round_s"),
                               "loss": m.get("loss"), "train_loss": m.get("train_loss"),
                               **{k: m.get(k) for k in ("load_s", "fold_s", "step_s", "write_s")}})
                prev = m["t"]
            report["per_round"] = rounds
            if status.get("error"):
                report["error"] = status["error"]
    finally:
        if guard is not None:
            guard.stop()
        if group is not None:
            group.close()
        if embedded is not None:
            embedded.close()
        logs = workdir / "logs"
        tracebacks = [p.name for p in sorted(logs.glob("*.log"))
                      if "Traceback" in p.read_text(errors="replace")] if logs.exists() else []
        report["logs_with_tracebacks"] = tracebacks
        for name in tracebacks:
            print(f"--- {name} (tail)\n{(logs / name).read_text(errors='replace')[-2000:]}", file=sys.stderr)
        if os.environ.get("AAS_BENCH_KEEP"):
            print(f"[bigmodel] kept {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)

    print_report(report)
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=1))
    ok = report.get("outcome") in ("succeeded", "round 0's shard tasks done")
    return 0 if ok else 2


def print_report(r: dict[str, Any]) -> None:
    model = r.get("model_fp32_gb") or float("nan")
    print(f"\n## gpt {r['size']} ({r.get('params', 0) / 1e6:.1f}M params, {model} GB fp32), "
          f"{r['shard_workers']} shard workers: {r.get('outcome')} in {r.get('wall_s')} s")
    print("| process | peak RSS GB | × fp32 model |")
    print("|---|---:|---:|")
    for name, gb in (r.get("peak_rss_gb") or {}).items():
        ratio = f"{gb / model:.1f}" if gb is not None and model == model else "–"
        print(f"| {name} | {gb} | {ratio} |")
    for i, rd in enumerate(r.get("per_round") or []):
        parts = ", ".join(f"{k.removesuffix('_s')} {rd[k]}" for k in ("load_s", "fold_s", "step_s", "write_s")
                          if rd.get(k) is not None)
        test = f", test loss {rd['loss']:.4f}" if rd.get("loss") is not None else ""
        print(f"  round {i}: {rd['round_s']} s (aggregator {rd['aggregator_s']} s: {parts}), "
              f"train loss {rd['train_loss']:.4f}{test}")
    print(f"  MemAvailable: {r['mem_available_start_gb']} GB at start, lowest {r.get('mem_available_lowest_gb')} GB")


if __name__ == "__main__":
    sys.exit(main())
