"""Load figures: many jobs at once, one very wide round, one very large model, memory over a long job.

    .venv/bin/python ops/chaos/load.py [--json FILE] [--quick] [--only concurrent,wide,big,flat]

Cases (each on a fresh cluster: its own redis-server, a local-folder store, 2 shard workers and 1
aggregator, real ``celery worker`` processes with one torch thread each):

    concurrent   20 tiny sync jobs submitted at once (2 shards, 6 rounds each)
    wide         one job with 1,000 shards and one round (digits: 1,438 samples, batch 2)
    big          a ~100-million-parameter digits-cnn (hidden 191,195) through one round
    flat         RSS of the aggregator and the shard workers sampled at every version of a 104-round job

Peak RSS is sampled every 0.1 s per process (psutil). Wall times run from submit (data staging and
version 0 included) to the job's end. Run it on an otherwise idle machine: the numbers are this box's.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
for p in (str(REPO), str(Path(__file__).resolve().parent)):
    if p not in sys.path:
        sys.path.insert(0, p)

import psutil  # noqa: E402
from chaos import RedisServer  # noqa: E402

from pipeline.client.processes import ProcessGroup, wait_for_workers, worker_argv  # noqa: E402
from workers.app import QUEUE_AGGREGATE, QUEUE_SHARDS  # noqa: E402

MB = 1024 * 1024
BIG_HIDDEN = 191_195  # digits-cnn: 523·hidden + 4,810 parameters → 100.0 M


@dataclass
class LocalCluster:
    """redis-server + a local-folder store + real workers, for one load case."""

    workdir: Path
    shard_workers: int = 2
    names: list[str] = field(default_factory=list)

    def __enter__(self) -> LocalCluster:
        self.redis = RedisServer(self.workdir / "redis")
        self.redis.start()
        env = {k: v for k, v in os.environ.items() if not k.startswith("AAS_")}
        env.update({"PYTHONPATH": str(REPO), "AAS_REDIS_URL": self.redis.url, "AAS_STORE_ROOT": str(self.store),
                    "AAS_DEVICE": "cpu", "AAS_TORCH_THREADS": "1", "AAS_TASK_TIME_LIMIT_S": "1800",
                    "AAS_VISIBILITY_TIMEOUT_S": "3600", "AAS_INSECURE_DEV": "1"})
        self.group = ProcessGroup(env=env, cwd=REPO, logdir=self.workdir / "logs")
        for i in range(self.shard_workers):
            self.names.append(f"shard-{i}")
            self.group.start(self.names[-1], worker_argv(self.names[-1], QUEUE_SHARDS))
        self.names.append("aggregator")
        self.group.start("aggregator", worker_argv("aggregator", QUEUE_AGGREGATE))
        from workers.app import app_for

        wait_for_workers(app_for(self.settings()), self.names, timeout_s=120)
        return self

    def __exit__(self, *_: object) -> None:
        self.group.close()
        self.redis.stop()

    @property
    def store(self) -> Path:
        return self.workdir / "store"

    def settings(self) -> Any:
        from pipeline.settings import Settings

        return Settings(_env_file=None, redis_url=self.redis.url, store_root=self.store, task_time_limit_s=1800,
                        visibility_timeout_s=3600)

    def client(self) -> Any:
        from pipeline.client import Client

        return Client(self.settings())

    def pids(self) -> dict[str, int]:
        return {n: self.group.procs[n].pid for n in self.names}


class RssSampler:
    """Peak resident memory per named process (and its children), sampled every `period_s` in a thread."""

    def __init__(self, pids: dict[str, int], period_s: float = 0.1) -> None:
        self.procs = {n: psutil.Process(pid) for n, pid in pids.items()}
        self.procs["driver"] = psutil.Process()
        self.peak: dict[str, int] = dict.fromkeys(self.procs, 0)
        self.period_s = period_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def now(self) -> dict[str, int]:
        out = {}
        for name, p in self.procs.items():
            try:
                out[name] = p.memory_info().rss + sum(c.memory_info().rss for c in p.children(recursive=True))
            except psutil.Error:
                out[name] = 0
        return out

    def _run(self) -> None:
        while not self._stop.is_set():
            for name, rss in self.now().items():
                self.peak[name] = max(self.peak[name], rss)
            self._stop.wait(self.period_s)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()

    def peak_mb(self) -> dict[str, float]:
        return {n: round(v / MB, 1) for n, v in self.peak.items()}


def _finish(client: Any, job_id: str, timeout_s: float) -> dict[str, Any]:
    final: dict[str, Any] = client.wait(job_id, timeout=timeout_s, poll_s=0.1)
    if final["status"] != "succeeded":
        raise RuntimeError(f"job {job_id} {final['status']}: {final.get('error')}")
    return final


# ---------------------------------------------------------------- cases


def case_concurrent(cluster: LocalCluster, jobs: int = 20) -> dict[str, Any]:
    client = cluster.client()
    spec = {"shards": 2, "epochs": 1, "batch_size": 128, "publish_every_versions": 0}  # 6 rounds each
    with RssSampler(cluster.pids()) as rss:
        t0 = time.perf_counter()
        ids = [client.submit({**spec, "seed": i}) for i in range(jobs)]
        submitted = time.perf_counter() - t0
        finals = [_finish(client, j, 900) for j in ids]
        wall = time.perf_counter() - t0
    per_job = [f["finished_at"] - f["created_at"] for f in finals]
    return {"jobs": jobs, "rounds_each": finals[0]["total_rounds"], "wall_s": round(wall, 2),
            "submit_all_s": round(submitted, 2), "job_s_mean": round(sum(per_job) / jobs, 2),
            "job_s_max": round(max(per_job), 2), "versions_per_s": round(sum(f["version"] for f in finals) / wall, 2),
            "peak_rss_mb": rss.peak_mb()}


def case_wide(cluster: LocalCluster, shards: int = 1000) -> dict[str, Any]:
    client = cluster.client()
    batch = -(-1438 // shards)  # the largest shard's size: every shard's data in one batch, so one round
    spec = {"shards": shards, "epochs": 1, "batch_size": batch, "publish_every_versions": 0}
    with RssSampler(cluster.pids()) as rss:
        t0 = time.perf_counter()
        job_id = client.submit(spec)
        staged = time.perf_counter() - t0
        final = _finish(client, job_id, 1800)
        wall = time.perf_counter() - t0
    metrics = client.jobs.metrics(job_id)
    return {"shards": shards, "rounds": final["total_rounds"], "wall_s": round(wall, 2), "submit_s": round(staged, 2),
            "aggregation_s": metrics[-1].get("round_s"), "consumed": len(client.jobs.consumed(job_id, 1)),
            "accuracy": final.get("test_accuracy"), "peak_rss_mb": rss.peak_mb()}


def case_big(cluster: LocalCluster, hidden: int = BIG_HIDDEN) -> dict[str, Any]:
    from pipeline.models import build_model, count_parameters

    params = count_parameters(build_model("digits-cnn", {"hidden": hidden}))
    client = cluster.client()
    spec = {"shards": 2, "epochs": 1, "batch_size": 1024, "model_args": {"hidden": hidden},
            "publish_every_versions": 0, "artifact_chain": "zstd"}
    with RssSampler(cluster.pids()) as rss:
        t0 = time.perf_counter()
        job_id = client.submit(spec)
        staged = time.perf_counter() - t0
        final = _finish(client, job_id, 3600)
        wall = time.perf_counter() - t0
    m = client.jobs.metrics(job_id)[-1]
    return {"parameters": params, "fp32_mb": round(params * 4 / MB, 1), "rounds": final["total_rounds"],
            "wall_s": round(wall, 2), "submit_s": round(staged, 2), "aggregation_s": m.get("round_s"),
            "bytes_up_mb": round(final["bytes_up"] / MB, 1), "bytes_down_mb": round(final["bytes_down"] / MB, 1),
            "peak_rss_mb": rss.peak_mb()}


def case_flat(cluster: LocalCluster, batch_size: int = 14, epochs: int = 2) -> dict[str, Any]:
    client = cluster.client()
    spec = {"shards": 2, "epochs": epochs, "batch_size": batch_size, "publish_every_versions": 10}
    samples: list[dict[str, Any]] = []
    with RssSampler(cluster.pids()) as rss:
        t0 = time.perf_counter()
        job_id = client.submit(spec)
        seen = 0
        while True:
            state = client.jobs.get(job_id)
            if state.version > seen:
                seen = state.version
                samples.append({"version": seen, **{n: round(v / MB, 1) for n, v in rss.now().items()}})
            if state.status in ("succeeded", "failed", "cancelled"):
                break
            time.sleep(0.02)
        wall = time.perf_counter() - t0
    first, last = samples[0], samples[-1]
    growth = {n: round(last[n] - first[n], 1) for n in cluster.names}
    return {"rounds": seen, "status": state.status, "wall_s": round(wall, 2), "first": first, "last": last,
            "growth_mb": growth, "peak_rss_mb": rss.peak_mb(), "samples": samples}


CASES: dict[str, Callable[..., dict[str, Any]]] = {"concurrent": case_concurrent, "wide": case_wide,
                                                   "big": case_big, "flat": case_flat}
QUICK: dict[str, dict[str, Any]] = {"concurrent": {"jobs": 4}, "wide": {"shards": 50},
                                    "big": {"hidden": 4096}, "flat": {"batch_size": 64, "epochs": 2}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="ops/chaos/load.py", description=__doc__.splitlines()[0])
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--quick", action="store_true", help="small sizes: a smoke test of the script")
    p.add_argument("--only", default=",".join(CASES), help=f"comma-separated cases (default: {','.join(CASES)})")
    args = p.parse_args(argv)
    results: dict[str, Any] = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                                           "ram_gb": round(psutil.virtual_memory().total / 1024**3, 1)}}
    for name in [c.strip() for c in args.only.split(",") if c.strip()]:
        with tempfile.TemporaryDirectory(prefix=f"aas-load-{name}-") as tmp, LocalCluster(Path(tmp)) as cluster:
            print(f"[load] {name} ...", flush=True)
            results[name] = CASES[name](cluster, **(QUICK[name] if args.quick else {}))
            shown = {k: v for k, v in results[name].items() if k != "samples"}
            print(f"[load] {name}: {json.dumps(shown)}", flush=True)
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
