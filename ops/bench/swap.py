"""Benchmark: how long after a publish do all inference workers serve the new version?

Two inference workers on loopback follow ``production`` on real Redis (db 14, flushed before and
after) with a local-folder store. For a small model (digits-cnn) and a ~100 MB one (digits-cnn with a
52k-wide hidden layer), each publish registers a version and moves the alias; the clock runs from the
alias move returning until every worker's GET /v1/models/{name} names the new version. Predict
latency is measured under light load without swaps and during swaps, on two clients at once: one on
the v1 endpoint (JSON), one on the Open Inference Protocol v2 ``infer`` endpoint through Triton's own
HTTP client (``tritonclient.http``, its default binary tensors).

    python ops/bench/swap.py [--quick] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import redis
import torch

from pipeline.artifacts import build_artifact
from pipeline.models import build_model, default_args
from storage.objectstore import LocalStore
from storage.registry import Registry

REPO = Path(__file__).resolve().parents[2]
REDIS_URL = os.environ.get("AAS_BENCH_REDIS_URL", "redis://127.0.0.1:6379/14")
POLL_S = 0.01  # how often the bench asks the workers which version they serve
# (registry name, architecture, model_args): the big one is ~27M fp32 parameters ≈ 100 MB
# (zstd barely shrinks random weights).
CASES = [("digits-cnn", "digits-cnn", {}), ("digits-cnn-100mb", "digits-cnn", {"hidden": 52_000})]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_worker(model: str, store_root: Path, log_dir: Path) -> tuple[str, subprocess.Popen[bytes]]:
    port = free_port()
    env = {**os.environ, "AAS_REDIS_URL": REDIS_URL, "AAS_STORE_ROOT": str(store_root), "AAS_TORCH_THREADS": "1",
           "AAS_INSECURE_DEV": "1"}  # a benchmark on loopback: unsigned on purpose
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    cmd = [sys.executable, "-m", "workers.inference", "--model", model, "--port", str(port), "--log-level", "warning"]
    with (log_dir / f"worker-{port}.log").open("wb") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    return f"http://127.0.0.1:{port}", proc


def served_version(client: httpx.Client, url: str, model: str) -> int | None:
    try:
        resp = client.get(f"{url}/v1/models/{model}")
    except httpx.HTTPError:
        return None
    return resp.json().get("version") if resp.status_code == 200 else None


def wait_all(client: httpx.Client, urls: list[str], model: str, version: int, timeout_s: float = 120.0) -> float:
    """Block until every worker serves `version`; return when that happened (perf_counter)."""
    deadline = time.perf_counter() + timeout_s
    pending = set(urls)
    while pending:
        pending = {u for u in pending if served_version(client, u, model) != version}
        if pending and time.perf_counter() > deadline:
            raise TimeoutError(f"workers {sorted(pending)} did not serve {model} v{version} within {timeout_s}s")
        if pending:
            time.sleep(POLL_S)
    return time.perf_counter()


class Load(threading.Thread):
    """One v1 client sending a batch of 4 every ~10 ms, round-robin over the workers; records latencies."""

    def __init__(self, urls: list[str], model: str) -> None:
        super().__init__(daemon=True)
        self.urls, self.model = urls, model
        self.latencies_s: list[float] = []
        self.errors = 0
        self.stop_event = threading.Event()
        self.body = {"inputs": np.random.rand(4, 64).round(4).tolist()}

    def run(self) -> None:
        with httpx.Client(timeout=30) as client:
            n = 0
            while not self.stop_event.is_set():
                t0 = time.perf_counter()
                try:
                    resp = client.post(
                        f"{self.urls[n % len(self.urls)]}/v1/models/{self.model}/predict", json=self.body
                    )
                    ok = resp.status_code == 200
                except httpx.HTTPError:
                    ok = False
                if ok:
                    self.latencies_s.append(time.perf_counter() - t0)
                else:
                    self.errors += 1
                n += 1
                time.sleep(0.01)


class TritonLoad(Load):
    """The same load through the v2 ``infer`` endpoint with Triton's HTTP client (binary tensors)."""

    def run(self) -> None:
        import tritonclient.http as triton  # a test extra; only this bench needs it

        # One client per worker, made in this thread: its gevent connections belong to the thread.
        clients = [triton.InferenceServerClient(u.removeprefix("http://"), network_timeout=30) for u in self.urls]
        x = np.asarray(self.body["inputs"], dtype=np.float32)  # (4, 64)
        n = 0
        while not self.stop_event.is_set():
            inp = triton.InferInput("input", list(x.shape), "FP32")
            inp.set_data_from_numpy(x)
            t0 = time.perf_counter()
            try:
                ok = clients[n % len(clients)].infer(self.model, [inp]).as_numpy("predictions").shape == (4,)
            except Exception:  # noqa: BLE001 - any failure (HTTP status, transport) is a failed request
                ok = False
            if ok:
                self.latencies_s.append(time.perf_counter() - t0)
            else:
                self.errors += 1
            n += 1
            time.sleep(0.01)
        for c in clients:
            c.close()


def run_loads(loads: list[Load]) -> None:
    for load in loads:
        load.start()


def stop_loads(loads: list[Load]) -> None:
    for load in loads:
        load.stop_event.set()
    for load in loads:
        load.join()


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def bench_case(name: str, arch: str, args: dict[str, Any], publishes: int, tmp: Path) -> dict[str, Any]:
    r = redis.Redis.from_url(REDIS_URL)
    r.flushdb()
    store = LocalStore(tmp / name / "store")
    reg = Registry(r, store)
    merged = {**default_args(arch), **args}
    artifacts = []
    for seed in (0, 1):  # two weight sets, alternated: the bench measures swaps, not training
        torch.manual_seed(seed)
        artifacts.append(build_artifact(arch, merged, build_model(arch, merged).state_dict())[0])

    def publish(i: int) -> tuple[int, float]:
        t0 = time.perf_counter()
        rec = reg.register(name, artifacts[i % 2], codec="fp32+zstd", metrics={}, lineage={"job": "bench"})
        reg.set_alias(name, "production", rec.version)
        return rec.version, time.perf_counter() - t0

    (tmp / name).mkdir(parents=True, exist_ok=True)
    publish(0)
    workers = [start_worker(name, tmp / name / "store", tmp / name) for _ in range(2)]
    urls = [u for u, _ in workers]
    try:
        with httpx.Client(timeout=5) as client:
            wait_all(client, urls, name, 1)
            idle, idle_v2 = Load(urls, name), TritonLoad(urls, name)
            run_loads([idle, idle_v2])
            time.sleep(3.0)
            stop_loads([idle, idle_v2])

            busy, busy_v2 = Load(urls, name), TritonLoad(urls, name)
            run_loads([busy, busy_v2])
            publish_s, swap_s = [], []
            for i in range(1, publishes + 1):
                version, took = publish(i)
                t_moved = time.perf_counter()
                swap_s.append(wait_all(client, urls, name, version) - t_moved)
                publish_s.append(took)
                reg.apply_retention(name, keep_last=3)
            stop_loads([busy, busy_v2])
    finally:
        for _, proc in workers:
            proc.terminate()
        for _, proc in workers:
            proc.wait(timeout=15)
        r.flushdb()
    return {
        "model": name,
        "artifact_mb": len(artifacts[0]) / 1e6,
        "publishes": publishes,
        "register_and_alias_s": {"p50": pct(publish_s, 50), "p99": pct(publish_s, 99)},
        "swap_s": {"p50": pct(swap_s, 50), "p99": pct(swap_s, 99), "max": max(swap_s)},
        "predict_idle_ms": {"p50": pct(idle.latencies_s, 50) * 1e3, "p99": pct(idle.latencies_s, 99) * 1e3},
        "predict_during_swaps_ms": {
            "p50": pct(busy.latencies_s, 50) * 1e3,
            "p99": pct(busy.latencies_s, 99) * 1e3,
        },
        "predict_requests": len(idle.latencies_s) + len(busy.latencies_s),
        "predict_errors": idle.errors + busy.errors,
        "v2_infer_idle_ms": {"p50": pct(idle_v2.latencies_s, 50) * 1e3, "p99": pct(idle_v2.latencies_s, 99) * 1e3},
        "v2_infer_during_swaps_ms": {
            "p50": pct(busy_v2.latencies_s, 50) * 1e3,
            "p99": pct(busy_v2.latencies_s, 99) * 1e3,
        },
        "v2_infer_requests": len(idle_v2.latencies_s) + len(busy_v2.latencies_s),
        "v2_infer_errors": idle_v2.errors + busy_v2.errors,
    }


def run(quick: bool = False) -> dict[str, Any]:
    """Run every case; 10 publishes each with `quick`, else 50."""
    redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2).ping()
    publishes = 10 if quick else 50
    with tempfile.TemporaryDirectory(prefix="aas-bench-swap-") as tmp:
        cases = [bench_case(name, arch, args, publishes, Path(tmp)) for name, arch, args in CASES]
    return {"bench": "swap", "quick": quick, "cpus": os.cpu_count(), "workers": 2, "cases": cases}


def markdown(result: dict[str, Any]) -> str:
    head = (
        "| model | artifact MB | publishes | register+alias p50/p99 s | alias→all serving p50/p99 s "
        "| v1 predict idle p50/p99 ms | v1 predict during swaps p50/p99 ms | v1 requests / errors "
        "| v2 infer idle p50/p99 ms | v2 infer during swaps p50/p99 ms | v2 requests / errors |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|"
    )
    rows = []
    for c in result["cases"]:
        rows.append(
            f"| {c['model']} | {c['artifact_mb']:.1f} | {c['publishes']} "
            f"| {c['register_and_alias_s']['p50']:.3f} / {c['register_and_alias_s']['p99']:.3f} "
            f"| {c['swap_s']['p50']:.3f} / {c['swap_s']['p99']:.3f} "
            f"| {c['predict_idle_ms']['p50']:.1f} / {c['predict_idle_ms']['p99']:.1f} "
            f"| {c['predict_during_swaps_ms']['p50']:.1f} / {c['predict_during_swaps_ms']['p99']:.1f} "
            f"| {c['predict_requests']} / {c['predict_errors']} "
            f"| {c['v2_infer_idle_ms']['p50']:.1f} / {c['v2_infer_idle_ms']['p99']:.1f} "
            f"| {c['v2_infer_during_swaps_ms']['p50']:.1f} / {c['v2_infer_during_swaps_ms']['p99']:.1f} "
            f"| {c['v2_infer_requests']} / {c['v2_infer_errors']} |"
        )
    return "\n".join([head, *rows])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="10 publishes per model instead of 50")
    p.add_argument("--json", type=Path, help="also write the results as JSON to this file")
    args = p.parse_args(argv)
    result = run(args.quick)
    print(markdown(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
