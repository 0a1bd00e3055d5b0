"""The GPU check: the shard worker's code path on CUDA, bf16 against fp32, and gpt training throughput.

Run through ``ops/bench/gpu`` (which provides the project's dependencies without touching torch):

    1 shard path   workers/shard.py train_shard through a Context on fakeredis + a local-folder store:
                   a gpt job staged as a client stages it; shard 0 twice on version 0 (the second on the
                   cached module), shard 1, the aggregation of the round (version 1), shard 0 on version 1.
                   The uploaded gradient is checked against a CPU fp32 gradient of the same rows.
    2 precision    on one gpt: bf16 autocast gradient vs fp32 (cosine, relative L2), and micro-batched
                   accumulation vs the full batch (fp32).
    3 throughput   gpt sizes fwd+bwd (what training.gradient does, without the copy to the host), bf16
                   autocast and fp32, samples/s, tokens/s, model TFLOP/s (6·N·tokens/s) and peak device
                   memory; the CPU's fp32 samples/s beside it for the sizes where that is feasible.

Every part runs even when an earlier one failed; any failure makes the exit status 1, after the tables.

    ops/bench/gpu [--json FILE] [--sizes 10m,100m,1b] [--cpu-sizes 10m,100m]
    ops/bench/gpu --cpu-smoke        # all of it on the CPU with a tiny gpt (bf16 autocast on the CPU)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[2]
SMOKE_ARGS = {"size": "1m", "block_size": 16, "n_layer": 2, "n_head": 2, "n_embd": 32}
BATCH_ROWS = {"10m": 128, "100m": 64, "1b": 32, "smoke": 4}  # samples (sequences) per step on the GPU
CPU_BATCH_ROWS = 8
# bf16 keeps ~3 significant digits: per-step gradients agree in direction (cosine) and to a few percent in
# norm; fp32 micro-batch accumulation differs from the full batch by rounding only.
MIN_COSINE, MAX_REL_L2_BF16, MAX_REL_L2_ACCUM = 0.99, 0.1, 1e-4


@dataclass(frozen=True)
class Plan:
    device: str
    sizes: tuple[str, ...]  # throughput rows on `device`
    cpu_sizes: tuple[str, ...]  # CPU rows beside them
    block_size: int  # T of every batch
    shard_args: dict[str, Any]  # the gpt of the shard path and the precision check
    precision: str  # the shard path's spec precision ("auto": bf16 on CUDA)
    steps: int  # timed steps per throughput row
    cpu_budget_s: float  # per CPU row
    deadline_s: float  # CPU rows are skipped (and said so) past this


def model_args(size: str) -> dict[str, Any]:
    return dict(SMOKE_ARGS) if size == "smoke" else {"size": size}


def plan_for(a: argparse.Namespace) -> Plan:
    if a.cpu_smoke:
        return Plan(device="cpu", sizes=("smoke",), cpu_sizes=("smoke",), block_size=16, shard_args=SMOKE_ARGS,
                    precision="bf16", steps=2, cpu_budget_s=2.0, deadline_s=a.deadline_s)
    return Plan(device="cuda", sizes=tuple(a.sizes.split(",")), cpu_sizes=tuple(filter(None, a.cpu_sizes.split(","))),
                block_size=256, shard_args={"size": "10m"}, precision="auto", steps=10, cpu_budget_s=25.0,
                deadline_s=a.deadline_s)


@dataclass
class Report:
    env: dict[str, Any] = field(default_factory=dict)
    shard: dict[str, Any] = field(default_factory=dict)
    precision: dict[str, Any] = field(default_factory=dict)
    throughput: list[dict[str, Any]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def compare(ref: dict[str, torch.Tensor], got: dict[str, torch.Tensor]) -> dict[str, float]:
    """Cosine and relative L2 error of the whole flattened gradient, in float64."""
    a = torch.cat([ref[n].flatten().double() for n in sorted(ref)])
    b = torch.cat([got[n].flatten().double() for n in sorted(ref)])
    cos = float(torch.nn.functional.cosine_similarity(a, b, dim=0))
    return {"cosine": round(cos, 6), "rel_l2": float((b - a).norm() / a.norm())}


# ------------------------------------------------------------------ 1 the shard worker's code path


def shard_path(plan: Plan, report: Report) -> None:
    import fakeredis

    from pipeline import blobs, codecs
    from pipeline.data import batch_rows, batches_per_epoch
    from pipeline.settings import Settings
    from pipeline.training import gradient
    from storage import keys
    from storage.jobstate import JobStore
    from storage.objectstore import LocalStore
    from workers import aggregator, shard
    from workers.context import Context
    from workers.dispatch import StubDispatcher
    from workers.staging import stage_job

    tmp = Path(tempfile.mkdtemp(prefix="aas-gpu-"))
    try:
        store = LocalStore(tmp / "store")
        r = fakeredis.FakeRedis()
        settings = Settings(redis_url="redis://fake", store_root=store.root, device=plan.device)
        ctx = Context(settings=settings, redis=r, store=store, jobs=JobStore(r), dispatch=StubDispatcher())
        device = ctx.device()
        batch = 32 if device.type == "cuda" else 4
        spec = {"model": "gpt", "model_args": plan.shard_args, "dataset": "chars",
                "dataset_args": {"block_size": plan.block_size, "max_chars": 400_000 if batch > 4 else 6_000},
                "shards": 2, "batch_size": batch, "micro_batch_size": batch // 2, "precision": plan.precision,
                "lr": 0.05, "momentum": 0.9, "publish_every_versions": 0, "promote": None}
        t = time.perf_counter()
        job_id = stage_job(ctx, spec)
        out: dict[str, Any] = {"device": str(device), "spec": spec, "stage_s": round(time.perf_counter() - t, 3)}

        def task(s: int, version: int, step: int, attempt: int) -> dict[str, Any]:
            t0 = time.perf_counter()
            res = shard.train_shard(ctx, job_id, s, version, step, attempt)
            sync(plan.device)
            if "key" not in res or "rejected" in res or not math.isfinite(float(res["loss"])):
                raise RuntimeError(f"shard {s} on v{version} gave no usable update: {res}")
            res["task_s"] = round(time.perf_counter() - t0, 3)
            return res

        first = task(0, 0, 0, 0)  # downloads, decodes and builds version 0 on the device
        cached = task(0, 0, 0, 1)  # the same version: the module is reused
        module = ctx.models.get(f"{keys.checkpoint(job_id, 0)}@{device}")
        if module is None or next(module.parameters()).device.type != device.type:
            raise RuntimeError(f"the shard worker did not keep version 0's module on {device}")
        other = task(1, 0, 0, 0)
        t = time.perf_counter()
        commit = aggregator.aggregate_round(ctx, job_id, 0, [first, other])
        agg_s = time.perf_counter() - t
        if not commit.committed or commit.version != 1:
            raise RuntimeError(f"the round was not committed: {commit}")
        after = task(0, 1, 1, 0)

        # The uploaded update (device, spec precision) against a CPU fp32 gradient of the same rows.
        job = ctx.jobs.get(job_id)
        from storage.datastore import Manifest

        manifest = Manifest.from_json(store.get(job.fields["manifest"]))
        x, y = ctx.split(manifest.shards[0], job_id)
        rows = batch_rows(manifest.shard_sizes[0], batch, 0, batches_per_epoch(manifest.shard_sizes, batch), 0, 0)
        from pipeline.checkpoint import decode_checkpoint

        ref_model = decode_checkpoint(store.get(keys.checkpoint(job_id, 0)), "v0").build("cpu")
        ref = gradient(ref_model, x[rows], y[rows], precision="fp32").update
        blob = blobs.decode(store.get(first["key"]), first["key"])
        got = codecs.decode(blob.tensors, blob.meta.get("codec") or {}, first["key"])
        agree = compare(ref, got)
        out.update(agreement_with_cpu_fp32=agree, aggregate_s=round(agg_s, 3), version_after=commit.version,
                   tasks=[{k: v for k, v in res.items() if k in ("shard", "version", "attempt", "loss", "task_s",
                                                                  "compute_s", "io_s", "bytes")}
                          for res in (first, cached, other, after)])
        report.shard = out
        if agree["cosine"] < MIN_COSINE or agree["rel_l2"] > MAX_REL_L2_BF16:
            raise RuntimeError(f"the shard worker's gradient on {device} disagrees with CPU fp32: {agree}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ------------------------------------------------------------------ 2 bf16 against fp32


def precision_check(plan: Plan, report: Report) -> None:
    from pipeline.data import load_dataset
    from pipeline.models import build_model
    from pipeline.training import gradient

    torch.manual_seed(0)
    device = torch.device(plan.device)
    with torch.device(device):
        model = build_model("gpt", plan.shard_args)
    ds = load_dataset("chars", {"block_size": plan.block_size, "max_chars": 200_000 if plan.device != "cpu"
                                else 6_000})
    rows = 32 if plan.device != "cpu" else 8
    x, y = ds.x_train[:rows].to(device), ds.y_train[:rows].to(device)  # (B, T)
    fp32 = gradient(model, x, y, precision="fp32")
    bf16 = gradient(model, x, y, precision="bf16")
    accum = gradient(model, x, y, precision="fp32", micro_batch_size=rows // 4)
    out = {"model_args": plan.shard_args, "rows": rows, "block_size": plan.block_size,
           "bf16_vs_fp32": compare(fp32.update, bf16.update), "loss_fp32": fp32.loss, "loss_bf16": bf16.loss,
           "micro_batches_vs_full": compare(fp32.update, accum.update)}
    report.precision = out
    b, m = out["bf16_vs_fp32"], out["micro_batches_vs_full"]
    if b["cosine"] < MIN_COSINE or b["rel_l2"] > MAX_REL_L2_BF16:
        raise RuntimeError(f"bf16 autocast gradient too far from fp32: {b} (need cosine ≥ {MIN_COSINE}, "
                           f"rel L2 ≤ {MAX_REL_L2_BF16})")
    if m["rel_l2"] > MAX_REL_L2_ACCUM:
        raise RuntimeError(f"micro-batched gradient differs from the full batch's: {m} (need ≤ {MAX_REL_L2_ACCUM})")


# ------------------------------------------------------------------ 3 throughput


def time_steps(model: torch.nn.Module, rows: int, t: int, device: torch.device, precision: str, *,
               steps: int | None, budget_s: float) -> tuple[float, int]:
    """fwd+bwd steps on random bytes: (seconds per step, steps timed) after one warm-up step."""
    from pipeline.training import autocast_dtype, loss_fn

    dtype = autocast_dtype(precision, device)
    x = torch.randint(0, 256, (rows, t), device=device)  # (B, T)
    y = torch.randint(0, 256, (rows, t), device=device)

    def step() -> None:
        model.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            loss = loss_fn(model(x), y)
        loss.backward()

    for _ in range(2 if device.type == "cuda" else 1):
        step()
    sync(str(device))
    t0, n = time.perf_counter(), 0
    while (steps is not None and n < steps) or (steps is None and (n == 0 or time.perf_counter() - t0 < budget_s)):
        step()
        n += 1
    sync(str(device))
    return (time.perf_counter() - t0) / n, n


def throughput_row(size: str, device: torch.device, precision: str, rows: int, plan: Plan,
                   steps: int | None) -> dict[str, Any]:
    from pipeline.models import build_model, count_parameters

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    torch.manual_seed(0)
    t = time.perf_counter()
    with torch.device(device):  # initialised where it trains: no 4 GB host copy for 1b
        model = build_model("gpt", model_args(size))
    build_s = time.perf_counter() - t
    n_params = count_parameters(model)
    per_step, n = time_steps(model, rows, plan.block_size, device, precision, steps=steps, budget_s=plan.cpu_budget_s)
    tokens_s = rows * plan.block_size / per_step
    row = {"size": size, "params": n_params, "device": str(device), "precision": precision, "rows": rows,
           "block_size": plan.block_size, "steps": n, "step_s": round(per_step, 5),
           "samples_s": round(rows / per_step, 2), "tokens_s": round(tokens_s, 1),
           "model_tflops": round(6 * n_params * tokens_s / 1e12, 3), "build_s": round(build_s, 2),
           "peak_mem_gb": round(torch.cuda.max_memory_allocated(device) / 1e9, 3) if device.type == "cuda" else None}
    del model
    return row


def throughput(plan: Plan, report: Report, started: float) -> None:
    device = torch.device(plan.device)
    main_precisions = ("bf16", "fp32")
    for size in plan.sizes:
        for precision in main_precisions:
            report.throughput.append(throughput_row(size, device, precision, BATCH_ROWS.get(size, 8), plan,
                                                    plan.steps))
            print_row(report.throughput[-1])
    if device.type == "cpu":
        return  # --cpu-smoke: the rows above already ran on the CPU
    for size in plan.cpu_sizes:
        if time.monotonic() - started > plan.deadline_s:
            skipped = f"past the {plan.deadline_s} s deadline"
            report.throughput.append({"size": size, "device": "cpu", "skipped": skipped})
            print(f"  cpu {size}: skipped (past the {plan.deadline_s} s deadline)")
            continue
        report.throughput.append(throughput_row(size, torch.device("cpu"), "fp32", CPU_BATCH_ROWS, plan, None))
        print_row(report.throughput[-1])


def print_row(r: dict[str, Any]) -> None:
    mem = f"{r['peak_mem_gb']:.2f}" if r.get("peak_mem_gb") is not None else "-"
    print(f"  {r['size']:>6} {r['device']:>6} {r['precision']:>5} {r['params'] / 1e6:9.1f}M  B={r['rows']:<4} "
          f"{r['samples_s']:10.2f} samples/s {r['tokens_s']:12.0f} tok/s {r['model_tflops']:8.2f} TFLOP/s "
          f"peak {mem} GB  ({r['steps']} steps)", flush=True)


def ratios(report: Report) -> list[dict[str, Any]]:
    """GPU bf16 samples/s over CPU fp32 samples/s, per size measured on both."""
    out = []
    gpu = {r["size"]: r for r in report.throughput if r.get("precision") == "bf16" and r["device"].startswith("cuda")}
    for r in report.throughput:
        if r["device"] == "cpu" and "samples_s" in r and r["size"] in gpu:
            out.append({"size": r["size"], "gpu_bf16_samples_s": gpu[r["size"]]["samples_s"],
                        "cpu_fp32_samples_s": r["samples_s"],
                        "gpu_over_cpu": round(gpu[r["size"]]["samples_s"] / r["samples_s"], 1)})
    return out


# ------------------------------------------------------------------ main


def environment(plan: Plan) -> dict[str, Any]:
    env: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                           "cpu_threads": torch.get_num_threads(), "host": platform.node(), "device": plan.device}
    if plan.device.startswith("cuda"):
        p = torch.cuda.get_device_properties(0)
        env.update(gpu=p.name, gpu_memory_gb=round(p.total_memory / 1e9, 1), capability=f"{p.major}.{p.minor}",
                   cuda=torch.version.cuda, bf16_supported=torch.cuda.is_bf16_supported())
    return env


def run_part(name: str, fn: Callable[[], None], report: Report) -> None:
    print(f"[gpu] {name} ...", flush=True)
    t = time.perf_counter()
    try:
        fn()
        print(f"[gpu] {name}: ok ({time.perf_counter() - t:.1f} s)", flush=True)
    except Exception as e:  # noqa: BLE001 - every part runs; each failure is reported and fails the run
        traceback.print_exc()
        report.failures.append(f"{name}: {type(e).__name__}: {e}")
        print(f"[gpu] {name}: FAILED: {e}", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu-smoke", action="store_true", help="run every part tiny on the CPU")
    ap.add_argument("--sizes", default="10m,100m,1b", help="gpt sizes of the device throughput rows")
    ap.add_argument("--cpu-sizes", default="10m,100m", help="gpt sizes also timed on the CPU ('' for none)")
    ap.add_argument("--deadline-s", type=float, default=300.0, help="skip CPU rows started later than this")
    ap.add_argument("--json", help="write the report here (default: $OUT/gpu_bench.json when OUT is set)")
    a = ap.parse_args(argv)
    plan = plan_for(a)
    started = time.monotonic()
    if plan.device == "cuda" and not torch.cuda.is_available():
        print(f"[gpu] FAILED: torch {torch.__version__} sees no CUDA device (use --cpu-smoke on a CPU machine)",
              file=sys.stderr)
        return 1
    # The fp32 reference must be fp32: no TF32 in matmuls.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    report = Report(env=environment(plan))
    print(f"[gpu] {json.dumps(report.env)}", flush=True)
    run_part("shard worker path", lambda: shard_path(plan, report), report)
    run_part("bf16 vs fp32", lambda: precision_check(plan, report), report)
    run_part("throughput", lambda: throughput(plan, report, started), report)

    print("\n## shard worker on", report.shard.get("device", plan.device))
    for t in report.shard.get("tasks", []):
        print(f"  shard {t['shard']} v{t['version']} attempt {t['attempt']}: task {t['task_s']} s "
              f"(compute {t['compute_s']} s, io {t['io_s']} s), loss {t['loss']:.4f}, {t['bytes']:,} bytes up")
    if report.shard:
        print(f"  aggregation {report.shard['aggregate_s']} s; uploaded gradient vs CPU fp32: "
              f"{report.shard['agreement_with_cpu_fp32']}")
    if report.precision:
        print("\n## precision")
        print(f"  bf16 vs fp32: {report.precision['bf16_vs_fp32']}  (loss {report.precision['loss_bf16']:.5f} "
              f"vs {report.precision['loss_fp32']:.5f})")
        print(f"  micro-batches vs full batch (fp32): {report.precision['micro_batches_vs_full']}")
    print("\n## throughput (fwd+bwd)")
    print("| size | params | device | precision | batch×T | samples/s | tokens/s | model TFLOP/s | peak GB |")
    print("|---|---:|---|---|---|---:|---:|---:|---:|")
    for r in report.throughput:
        if "samples_s" not in r:
            print(f"| {r['size']} | | {r['device']} | | | {r.get('skipped', '')} | | | |")
            continue
        mem = r["peak_mem_gb"] if r["peak_mem_gb"] is not None else "–"
        print(f"| {r['size']} | {r['params'] / 1e6:.1f}M | {r['device']} | {r['precision']} "
              f"| {r['rows']}×{r['block_size']} | {r['samples_s']:.1f} | {r['tokens_s']:.0f} "
              f"| {r['model_tflops']:.2f} | {mem} |")
    rat = ratios(report)
    for r in rat:
        print(f"  {r['size']}: GPU bf16 {r['gpu_bf16_samples_s']} samples/s vs CPU fp32 {r['cpu_fp32_samples_s']}: "
              f"{r['gpu_over_cpu']}×")
    wall = round(time.monotonic() - started, 1)
    doc = {**asdict(report), "ratios": rat, "wall_s": wall, "plan": asdict(plan)}
    path = a.json or (os.path.join(os.environ["OUT"], "gpu_bench.json") if os.environ.get("OUT") else None)
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(doc, indent=1, default=str))
        print(f"\n[gpu] report: {path}")
    if report.failures:
        print(f"\n[gpu] FAILED ({len(report.failures)}), {wall} s:", file=sys.stderr)
        for f in report.failures:
            print(f"  - {f}", file=sys.stderr)
        return 1
    print(f"\n[gpu] all parts passed in {wall} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
