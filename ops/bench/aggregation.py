"""Benchmark: one sync aggregation against its floor, by number of shards and parameters.

For each (parameters, shards): a job is staged (a gpt of about that many parameters, momentum SGD), the
shards' fp32 updates are written as the shard workers write them (``workers.shard.upload_update``),
then two fresh processes run, one after the other, on the same files (warm in the page cache):

- floor: read the checkpoint and every update blob at disk speed (``store.get``), add each update into
  an fp32 sum (one ``add_`` per tensor on the raw bytes: no verification, no decoding), one in-place
  momentum SGD step. Nothing the aggregation does can be faster than this.
- aggregation: ``workers.aggregator.aggregate_round``, the real task body: load version N, fold every
  verified update (digest, signature, identity, codec, shapes), step, write version N+1, commit.

Both start from version N in memory, as a running aggregator does (it wrote N itself): the checkpoint is
read before the clock starts. Each reports its time and its peak memory above what the process held
before it read anything (VmHWM − VmRSS, /proc: the interpreter and torch). Ratios are taken within the
run: fold / floor (the same bytes read and added, plus verification), task / floor, memory / fp32 model
size. A fitted law t ≈ P·(a + b·N) closes the table.

    ops/bench/run aggregation [--params-m 25] [--shards 2,8,32] [--json FILE]
    ops/bench/run aggregation --params-m 1,10,25,100 --shards 2    # growth with parameters

Redis: AAS_REDIS_URL, else db 11 of the local server (flushed).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
PIN_ENV = "AAS_BENCH_PIN_CPU"  # a child's core (--pin)
sys.path.insert(0, str(REPO))
MB = 1e6


def proc_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def model_args(params_m: float) -> dict[str, Any]:
    """A gpt shape of about `params_m` million parameters (n_layer · 12 · d² dominates)."""
    d = 256 if params_m < 3 else 512 if params_m < 40 else 768
    layers = max(1, round(params_m * 1e6 / (12 * d * d)))
    return {"size": None, "n_layer": layers, "n_head": d // 64, "n_embd": d, "block_size": 32}


def settings_env(workdir: Path) -> dict[str, str]:
    # A per-run signing key: the aggregation verifies signatures as production workers do.
    key = os.environ.get("AAS_SIGNING_KEY") or os.environ.setdefault("AAS_BENCH_SIGNING_KEY", secrets.token_hex(32))
    return {"AAS_SIGNING_KEY": key, "AAS_STORE_ROOT": str(workdir / "store"),
            "AAS_REDIS_URL": os.environ.get("AAS_REDIS_URL", "redis://127.0.0.1:6379/11"),
            "AAS_S3_ENDPOINT": "", "AAS_MAX_BLOB_BYTES": str(8 << 30), "AAS_TORCH_THREADS": "1"}


def context() -> Any:
    from pipeline.settings import get_settings
    from storage.services import build_services
    from workers.context import Context
    from workers.dispatch import StubDispatcher

    get_settings.cache_clear()
    s = get_settings()
    svc = build_services(s)
    return Context(settings=s, redis=svc.redis, store=svc.store, jobs=svc.jobs, dispatch=StubDispatcher())


def stage(params_m: float, shards: int, parts: int = 1, rounds: int = 1, spec: dict[str, Any] | None = None,
          flush: bool = True) -> dict[str, Any]:
    """Stage a job (`spec`: fields added to its spec) and write every shard's update (one blob per range with
    `parts`) for `rounds` rounds; return what the children need (``results``: round 0's claim checks;
    ``results1``: round 1's, with 2 rounds; ``rounds``: every round's). `flush`: empty the Redis db first."""
    import torch

    from pipeline import codecs
    from pipeline.aggregate import partition
    from pipeline.client import Client
    from storage import keys
    from workers.shard import upload_update

    ctx = context()
    if flush:
        ctx.redis.flushdb()
    client = Client(ctx.settings, store=ctx.store, redis_client=ctx.redis, dispatch=ctx.dispatch)
    job_id = client.stage({"model": "gpt", "model_args": model_args(params_m), "dataset": "chars",
                           "dataset_args": {"block_size": 32, "max_chars": 40_000}, "shards": shards,
                           "batch_size": 4, "lr": 0.01, "momentum": 0.9, "publish_every_versions": 0,
                           "aggregation_parts": parts, **(spec or {})})
    ckpt = ctx.checkpoint(keys.checkpoint(job_id, 0), job_id)
    names = ctx.param_names(ckpt)
    n_params = sum(ckpt.state[n].numel() for n in names)
    ranges = partition([(n, ckpt.state[n].numel()) for n in names], parts)
    gen = torch.Generator().manual_seed(0)
    per_round: list[list[dict[str, Any]]] = [[] for _ in range(rounds)]
    for v in range(rounds):
        for s in range(shards):
            grads = {n: torch.randn(ckpt.state[n].shape, generator=gen) * 1e-3 for n in names}
            enc = codecs.encode(grads, codecs.CodecConfig(name="none"))
            per_round[v].append(upload_update(ctx, job_id, s, v, v, 0, enc, samples=4, loss=1.0, ranges=ranges))
            del grads, enc
    out = {"job_id": job_id, "results": per_round[0], "params": n_params, "model_mb": 4 * n_params / MB,
           "parts": len(ranges), "rounds": per_round}
    if rounds > 1:
        out["results1"] = per_round[1]
    return out


def child_floor(job: dict[str, Any]) -> dict[str, Any]:
    import torch

    from pipeline import blobs, tensorfile
    from storage import keys

    ctx = context()
    base = proc_kb("VmRSS")

    def tensors_of(data: bytearray) -> dict[str, torch.Tensor]:
        _, payload = blobs.read_header(data)  # where the safetensors bytes start: no digest, no checks
        return tensorfile.load(payload)

    state = tensors_of(ctx.store.get(keys.checkpoint(job["job_id"], 0)))
    t0 = time.perf_counter()
    acc: dict[str, torch.Tensor] = {}
    t_read = 0.0
    for r in job["results"]:
        t = time.perf_counter()
        data = ctx.store.get(r["key"])
        t_read += time.perf_counter() - t
        for name, g in tensors_of(data).items():
            if name in acc:
                acc[name].add_(g, alpha=4.0)
            else:
                acc[name] = g.mul(4.0)
        del data
    t_fold = time.perf_counter()
    bufs = {}
    for name, g in acc.items():
        p = state["model." + name.removesuffix(".values")].view(-1)
        g.div_(4.0 * len(job["results"]))
        bufs[name] = g.clone()  # the first step's momentum buffer, as torch.optim.SGD makes it
        p.add_(bufs[name], alpha=-0.01)
    t1 = time.perf_counter()
    return {"floor_s": t1 - t0, "floor_fold_s": t_fold - t0, "floor_read_s": t_read, "floor_step_s": t1 - t_fold,
            "floor_peak_mb": (proc_kb("VmHWM") - base) * 1024 / MB}


def child_aggregate(job: dict[str, Any]) -> dict[str, Any]:
    from pipeline.aggregate import Accumulator
    from storage import keys
    from workers.aggregator import aggregate_round
    from workers.updates import fold_blob

    ctx = context()
    base = proc_kb("VmRSS")
    ckpt = ctx.checkpoint(keys.checkpoint(job["job_id"], 0), job["job_id"], with_opt=True)
    shapes = {n: tuple(ckpt.state[n].shape) for n in ctx.param_names(ckpt)}
    del ckpt
    # Warm-up, as a running aggregator is: fold shard 0's blob once into a sum that is thrown away (first
    # calls import and initialise; on a small model they would be most of the time).
    r0 = job["results"][0]
    fold_blob(ctx, job["job_id"], r0["key"], r0["sha256"], shapes, {"job": job["job_id"], "shard": 0,
                                                                       "base_version": 0}, Accumulator(shapes))
    version = 0
    if "results1" in job:  # the steady state: round 0 untimed (its version 1 stays in this process, as it does
        aggregate_round(ctx, job["job_id"], 0, job["results"])  # in a running aggregator), round 1 timed
        version = 1
    t0 = time.perf_counter()
    done = aggregate_round(ctx, job["job_id"], version, job["results1"] if version else job["results"])
    t1 = time.perf_counter()
    if not done.committed:
        raise RuntimeError("the aggregation did not commit")
    m = done.metrics
    return {"task_s": t1 - t0, "load_s": m["load_s"], "fold_s": m["fold_s"], "step_s": m["step_s"],
            "write_s": m["write_s"], "task_peak_mb": (proc_kb("VmHWM") - base) * 1024 / MB}


def child_part(job: dict[str, Any], part: int) -> dict[str, Any]:
    """One aggregation part, in its own process (as K aggregator processes run them), after a warm-up."""
    from pipeline.aggregate import Accumulator
    from pipeline.spec import JobSpec
    from workers.aggregator import aggregate_part, part_ranges
    from workers.updates import fold_blob

    ctx = context()
    base = proc_kb("VmRSS")
    spec = JobSpec.model_validate(ctx.jobs.get(job["job_id"]).spec)
    ranges = part_ranges(ctx, spec)
    from storage import keys

    ckpt = ctx.checkpoint(keys.checkpoint(job["job_id"], 0), job["job_id"], with_opt=True)
    shapes = {n: tuple(ckpt.state[n].shape) for n in ranges[part]}
    del ckpt
    b0 = job["results"][0]["parts"][part]
    fold_blob(ctx, job["job_id"], b0["key"], b0["sha256"], shapes,
              {"job": job["job_id"], "shard": 0, "base_version": 0, "part": part}, Accumulator(shapes))
    version = 0
    if "results1" in job:  # the steady state: round 0 untimed, each part's version 1 kept by its process
        aggregate_part(ctx, job["job_id"], 0, job["results"], part)
        version = 1
    print("ready", flush=True)
    sys.stdin.readline()  # "go": every part starts together (with 2 rounds, once version 1 is committed)
    start = time.time()
    done = aggregate_part(ctx, job["job_id"], version, job["results1"] if version else job["results"], part)
    end = time.time()
    mine = ctx.jobs.parts_done(job["job_id"], version).get(str(part), {})
    return {"start": start, "end": end, "committed": done.committed,
            "peak_mb": (proc_kb("VmHWM") - base) * 1024 / MB,
            **{k: mine[k] for k in ("fold_s", "step_s", "write_s") if k in mine}}


def run_parts(job: dict[str, Any], env: dict[str, str], pin: bool = False) -> dict[str, Any]:
    """K part processes at once; the aggregation's time runs from the first start to the last end. With `pin`,
    part p runs on core p alone (K aggregator hosts of one core each)."""
    procs = [subprocess.Popen([sys.executable, __file__, "--child", "part", "--part", str(p)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, **env, "PYTHONPATH": str(REPO),
                                   **({PIN_ENV: str(p % (os.cpu_count() or 1))} if pin else {})})
             for p in range(job["parts"])]
    for p in procs:  # every child gets its input before any is waited for
        assert p.stdin is not None and p.stdout is not None
        p.stdin.write(json.dumps(job) + "\n")
        p.stdin.flush()
    for p in procs:  # ... and all are warmed up before any starts
        assert p.stdout is not None
        if p.stdout.readline().strip() != "ready":
            raise RuntimeError("a part child failed before it was ready")
    for p in procs:
        assert p.stdin is not None
        p.stdin.write("go\n")
        p.stdin.close()
    outs = []
    for p in procs:
        assert p.stdout is not None and p.stderr is not None
        out, err = p.stdout.read(), p.stderr.read()
        p.wait()
        if p.returncode != 0:
            raise RuntimeError(f"part child failed:\n{err[-3000:]}")
        outs.append(json.loads(out.strip().splitlines()[-1]))
    if sum(o["committed"] for o in outs) != 1:
        raise RuntimeError(f"expected exactly one committing part, got {outs}")
    return {"task_s": max(o["end"] for o in outs) - min(o["start"] for o in outs),
            "task_peak_mb": max(o["peak_mb"] for o in outs),
            "per_part": [{k: o.get(k) for k in ("fold_s", "step_s", "write_s", "committed")}
                         | {"s": round(o["end"] - o["start"], 3)} for o in outs]}


def run_child(kind: str, job: dict[str, Any], env: dict[str, str], pin: bool = False) -> dict[str, Any]:
    out = subprocess.run([sys.executable, __file__, "--child", kind], input=json.dumps(job), text=True,
                         capture_output=True, env={**os.environ, **env, "PYTHONPATH": str(REPO),
                                                   **({PIN_ENV: "0"} if pin else {})}, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{kind} child failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def line(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least squares y = a + b·x (b = 0 when every x is the same)."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    var = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / var if var else 0.0
    return my - b * mx, b


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params-m", default="25", help="comma-separated model sizes, millions of parameters")
    ap.add_argument("--shards", default="2,8,32", help="comma-separated shard counts")
    ap.add_argument("--json", help="write the rows here")
    ap.add_argument("--parts", default="", help="comma-separated K to compare (e.g. 1,2): K aggregation "
                    "processes in parallel against one, timed on round 1 (each process keeps its own version 1, as a "
                    "running aggregator does); replaces the floor table")
    ap.add_argument("--pin", action="store_true", help="with --parts: one core per aggregation process (core p for "
                    "part p; core 0 for K=1), as K aggregator hosts of one core each")
    ap.add_argument("--checkpoint-every", type=int, default=1, help="the jobs' checkpoint_every_versions: where it "
                    "is > 2 the timed round stores its version as its recipe (version 1; version 2 with --parts)")
    ap.add_argument("--child", choices=["floor", "aggregate", "part"], help=argparse.SUPPRESS)
    ap.add_argument("--part", type=int, default=0, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        if os.environ.get(PIN_ENV):
            os.sched_setaffinity(0, {int(os.environ[PIN_ENV])})  # this process and the threads it starts
        import torch

        from pipeline.settings import get_settings

        # As a worker process is set up (workers/app.py): without it torch ran an OpenMP thread per core, and two
        # unpinned part processes' threads waited on each other (a 12M-element SGD step took 0.39 s, not 0.02).
        torch.set_num_threads(get_settings().torch_threads)
        job = json.loads(sys.stdin.readline() if a.child == "part" else sys.stdin.read())
        run = {"floor": child_floor, "aggregate": child_aggregate}.get(a.child)
        print(json.dumps(run(job) if run else child_part(job, a.part)))
        return 0
    if a.parts:
        return compare_parts(a)

    rows = []
    for env, params_m, shards in configurations(a):
        print(f"[aggregation] {params_m:g}M parameters × {shards} shards: staging", file=sys.stderr, flush=True)
        job = stage(params_m, shards, spec=_every(a))
        row = {"params": job["params"], "model_mb": round(job["model_mb"], 1), "shards": shards}
        row.update(run_child("floor", job, env))
        row.update(run_child("aggregate", job, env))
        row["fold_over_floor"] = row["fold_s"] / row["floor_fold_s"]
        row["task_over_floor"] = row["task_s"] / row["floor_s"]
        row["peak_over_model"] = row["task_peak_mb"] / row["model_mb"]
        rows.append(row)
        print(f"[aggregation]   floor {row['floor_s']:.2f} s, task {row['task_s']:.2f} s, "
              f"peak {row['task_peak_mb']:.0f} MB", file=sys.stderr, flush=True)
    print_table(rows)
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))
    return 0


def configurations(a: argparse.Namespace) -> Iterator[tuple[dict[str, str], float, int]]:
    """(environment, millions of parameters, shards) for every requested pair, each on an emptied store."""
    with tempfile.TemporaryDirectory(prefix="aas-aggbench-") as tmp:
        env = settings_env(Path(tmp))
        os.environ.update(env)
        for params_m in [float(x) for x in a.params_m.split(",")]:
            for shards in [int(x) for x in a.shards.split(",")]:
                yield env, params_m, shards
                shutil.rmtree(Path(tmp) / "store", ignore_errors=True)


def _every(a: argparse.Namespace) -> dict[str, Any]:
    """The staged jobs' checkpoint_every_versions (--checkpoint-every), where it is not the default."""
    return {"checkpoint_every_versions": a.checkpoint_every} if a.checkpoint_every > 1 else {}


def compare_parts(a: argparse.Namespace) -> int:
    rows = []
    for env, params_m, shards in configurations(a):
        for parts in [int(x) for x in a.parts.split(",")]:
            print(f"[aggregation] {params_m:g}M × {shards} shards, {parts} part(s)", file=sys.stderr, flush=True)
            job = stage(params_m, shards, parts, rounds=2, spec=_every(a))
            row = {"params": job["params"], "shards": shards, "parts": job["parts"], "round": 1, "pinned": a.pin,
                   "checkpoint_every": a.checkpoint_every}
            row.update(run_parts(job, env, a.pin) if job["parts"] > 1 else
                       {k: v for k, v in run_child("aggregate", job, env, a.pin).items()
                        if k in ("task_s", "task_peak_mb", "fold_s", "step_s", "write_s")})
            rows.append(row)
    print(f"checkpoint every {a.checkpoint_every} version(s); {'one core each' if a.pin else 'unpinned'}")
    print("| params | shards | parts | aggregation s | × one part | fold / step / write s (per part) "
          "| peak MB per process |")
    print("|---:|---:|---:|---:|---:|---|---:|")
    for r in rows:
        one = next((x for x in rows if x["params"] == r["params"] and x["shards"] == r["shards"]
                    and x["parts"] == 1), None)
        ratio = f"{r['task_s'] / one['task_s']:.2f}×" if one else "–"
        per = r.get("per_part") or [r]
        phases = " / ".join("–".join(sorted({f"{float(p[k]):.2f}" for p in per if p.get(k) is not None}))
                            for k in ("fold_s", "step_s", "write_s"))
        print(f"| {r['params'] / 1e6:.1f}M | {r['shards']} | {r['parts']} | {r['task_s']:.2f} | {ratio} | {phases} "
              f"| {r['task_peak_mb']:.0f} |")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))
    return 0


def print_table(rows: list[dict[str, Any]]) -> None:
    print("| params | shards | floor s (read+add / step) | fold s | fold/floor | step s | write s | task s "
          "| task/floor | peak MB | peak/model | floor peak/model |")
    print("|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['params'] / 1e6:.1f}M | {r['shards']} | {r['floor_s']:.2f} ({r['floor_fold_s']:.2f} / "
              f"{r['floor_step_s']:.2f}) | {r['fold_s']:.2f} | {r['fold_over_floor']:.2f}× | {r['step_s']:.2f} "
              f"| {r['write_s']:.2f} | {r['task_s']:.2f} | {r['task_over_floor']:.2f}× | {r['task_peak_mb']:.0f} "
              f"| {r['peak_over_model']:.2f}× | {r['floor_peak_mb'] / r['model_mb']:.2f}× |")
    if len({r["shards"] for r in rows}) > 1:  # t/P = a + b·N
        a, b = line([r["shards"] for r in rows], [1e3 * r["task_s"] / (r["params"] / 1e6) for r in rows])
        print(f"\nfitted over shards: task time ≈ P(M params) × ({a:.1f} ms + {b:.2f} ms × shards)")
    if len({r["params"] for r in rows}) > 1:  # t = a + b·P, peak = c + k·model
        a, b = line([r["params"] / 1e6 for r in rows], [r["task_s"] for r in rows])
        c, k = line([r["model_mb"] for r in rows], [r["task_peak_mb"] for r in rows])
        print(f"\nfitted over parameters: task time ≈ {a:.2f} s + {1e3 * b:.1f} ms × P(M params); "
              f"peak ≈ {k:.2f} × fp32 model + {c:.0f} MB")


if __name__ == "__main__":
    sys.exit(main())
