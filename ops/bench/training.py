"""Benchmark: the pipeline's training against a single-process loop and torch.distributed DDP.

Same model, data, initialisation, optimizer and epoch budget in every row; the global batch is
shards × batch_size everywhere, and the reference loops walk exactly the mini-batches the pipeline's
shards walk (``pipeline.data.batch_rows``), so sync H=1 should reach the reference's numbers.

    a  reference   one process, one loop, torch threads = shards (the same cores the workers get)
    b  ddp         torch.distributed DDP, gloo, `shards` spawned processes, 1 torch thread each
    c  sync        the pipeline, sync rounds         ┐ 2 shard workers + 1 aggregator: real
    d  async       the pipeline, async updates       │ `celery worker` processes on an embedded
    e  sync H=8    the pipeline, DiLoCo local steps  │ Redis, a local-folder store; the bench
    f  async slow  async, shard worker 0 is 3× slower│ submits with pipeline.client.Client
    g  sync slow   sync, shard worker 0 is 3× slower ┘ (AAS_SLOW_FACTOR=3 for that worker only)

Async rows submit the sync rows' spec with mode "async" (the same lr and momentum: nothing tuned by hand).

Time shares of the pipeline rows are of shard-worker time (wall × workers): compute and io are the
sums of the shard tasks' own compute_s / io_s, read back from the Celery result backend; "other" is
the rest: queueing, the round barrier, waiting for the aggregator, encoding blobs, Celery's overhead.
"agg" is the aggregator's recorded per-version time (fetch, step, checkpoint, evaluation) over the
wall time. A pipeline row's wall time runs from submit (data staging included) to the job's end; its "to last
version" rate stops at the last version's commit, leaving out the final evaluation and registration (DDP's
and the single process's rows leave their final evaluation out of their time too).
The machine's other load shows in every number: run it on an otherwise idle machine.

Warm workers: before its first timed row a cluster runs two versions of a throw-away job of the same spec
(then cancels it), as the workers of a service that has been up have: their imports, the model's first
build and the data split's first read are not in a row's time, as DDP's process start and rendezvous are
not in its row's. ``--cold`` times each cluster's first job from cold instead.

    ops/bench/run training [--quick] [--cold] [--json FILE] [--model char-lm|digits-cnn]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[2]
SLOW_FACTOR = 3


@dataclass(frozen=True)
class Budget:
    """What every row trains: model, data, optimizer and the epoch budget."""

    model: str
    model_args: dict[str, Any]
    dataset: str
    dataset_args: dict[str, Any]
    task: str  # "classify" → accuracy, "lm" → perplexity
    shards: int = 2
    batch_size: int = 32  # per shard and step
    epochs: int = 1
    lr: float = 0.05
    momentum: float = 0.9
    local_steps: int = 8  # row e
    seed: int = 0
    row_timeout_s: float = 600.0
    async_spec: dict[str, Any] = field(default_factory=dict)  # --async-spec: fields set on the async rows only
    sync_spec: dict[str, Any] = field(default_factory=dict)  # --sync-spec: fields set on the sync pipeline rows only
    common_spec: dict[str, Any] = field(default_factory=dict)  # --spec: fields set on every pipeline row

    def spec(self, **overrides: Any) -> dict[str, Any]:
        """The job's spec: the budget's fields, then --spec's, then `overrides`. The inner lr of local steps is
        the resulting lr unless one of them sets it (a --spec lr that left it at the budget's lr ran H > 1 rows at
        twice sync's rate)."""
        base = {"model": self.model, "model_args": self.model_args, "dataset": self.dataset,
                "dataset_args": self.dataset_args, "shards": self.shards, "batch_size": self.batch_size,
                "epochs": self.epochs, "lr": self.lr, "momentum": self.momentum,
                "seed": self.seed, "publish_every_versions": 0, "promote": None, **self.common_spec}
        out = {**base, **overrides}
        out.setdefault("inner_lr", out["lr"])
        return out


def budget_for(model: str, quick: bool) -> Budget:
    if model == "digits-cnn":
        return Budget("digits-cnn", {}, "digits", {}, "classify", batch_size=32, epochs=2 if quick else 5,
                      lr=0.05, row_timeout_s=150 if quick else 900)
    if model != "char-lm":
        raise SystemExit(f"unknown --model {model!r} (known: char-lm, digits-cnn)")
    from pipeline.models import default_args

    chars = {"block_size": 64, "max_chars": 60_000 if quick else 600_000}
    return Budget("char-lm", default_args("char-lm"), "chars", chars, "lm", batch_size=16 if quick else 32,
                  epochs=1, lr=0.1, row_timeout_s=150 if quick else 1800)


# ------------------------------------------------------------------ reference loops (rows a, b)


def shard_plan(n: int, b: Budget) -> tuple[list[torch.Tensor], list[int], int]:
    """The pipeline's shards of range(n), their sizes, and batches per epoch."""
    from pipeline.data import batches_per_epoch, shard_indices

    parts = shard_indices(n, b.shards, b.seed)
    sizes = [int(p.numel()) for p in parts]
    return parts, sizes, batches_per_epoch(sizes, b.batch_size)


def global_batches(x: torch.Tensor, y: torch.Tensor, b: Budget) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The union of every shard's step-k mini-batch, for each step the pipeline's epoch budget covers."""
    from pipeline.data import batch_rows

    parts, sizes, bpe = shard_plan(int(x.shape[0]), b)
    for step in range(b.epochs * bpe):
        idx = torch.cat([p[batch_rows(n, b.batch_size, step, bpe, b.seed, s)] for s, (p, n) in
                         enumerate(zip(parts, sizes, strict=True))])
        yield x[idx], y[idx]  # (shards × batch, ...)


def initial_model(b: Budget) -> torch.nn.Module:
    from pipeline.checkpoint import initial_checkpoint

    return initial_checkpoint(b.model, b.model_args, b.seed).build()  # the pipeline's version 0


def final_metric(model: torch.nn.Module, ds: Any, b: Budget) -> dict[str, float]:
    from pipeline.training import evaluate

    return evaluate(model, ds.x_test, ds.y_test, b.task)


def run_reference(b: Budget) -> dict[str, Any]:
    from pipeline.data import load_dataset
    from pipeline.training import loss_fn

    ds = load_dataset(b.dataset, b.dataset_args)
    threads = torch.get_num_threads()
    torch.set_num_threads(min(b.shards, os.cpu_count() or 1))
    try:
        model = initial_model(b)
        opt = torch.optim.SGD(model.parameters(), lr=b.lr, momentum=b.momentum)
        samples, t0 = 0, time.perf_counter()
        model.train()
        for xb, yb in global_batches(ds.x_train, ds.y_train, b):
            loss = loss_fn(model(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            samples += int(xb.shape[0])
        wall = time.perf_counter() - t0
        return {"samples": samples, "wall_s": wall, **final_metric(model, ds, b), "bytes": 0,
                "compute": 1.0, "io": 0.0, "note": f"{torch.get_num_threads()} torch threads, data in memory"}
    finally:
        torch.set_num_threads(threads)


def _ddp_rank(rank: int, b: Budget, port: int, out: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from pipeline.data import batch_rows, load_dataset
    from pipeline.training import loss_fn

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=b.shards)
    try:
        ds = load_dataset(b.dataset, b.dataset_args)
        parts, sizes, bpe = shard_plan(ds.n_train, b)
        x, y = ds.x_train[parts[rank]], ds.y_train[parts[rank]]  # exactly the pipeline's shard `rank`
        model = DistributedDataParallel(initial_model(b))
        opt = torch.optim.SGD(model.parameters(), lr=b.lr, momentum=b.momentum)
        dist.barrier()
        t0, busy, samples, steps = time.perf_counter(), 0.0, 0, 0
        for step in range(b.epochs * bpe):
            rows = batch_rows(sizes[rank], b.batch_size, step, bpe, b.seed, rank)
            t1 = time.perf_counter()
            logits = model(x[rows])
            # A shard that ran out this step still joins the all-reduce (DDP needs every rank), with zero.
            loss = loss_fn(logits, y[rows]) if rows.numel() else logits.sum() * 0.0
            opt.zero_grad(set_to_none=True)
            loss.backward()  # gradients are all-reduced (mean over ranks) inside backward
            opt.step()
            busy += time.perf_counter() - t1
            samples += int(rows.numel())
            steps += 1
        dist.barrier()
        wall = time.perf_counter() - t0
        stats = torch.tensor([samples, busy], dtype=torch.float64)
        dist.all_reduce(stats)
        if rank == 0:
            n_params = sum(p.numel() for p in model.parameters())
            ring = 2 * (b.shards - 1) / b.shards  # bytes each rank sends per byte all-reduced (ring)
            Path(out).write_text(json.dumps({
                "samples": int(stats[0]), "wall_s": wall, **final_metric(model.module, ds, b),
                "bytes": int(steps * n_params * 4 * ring * b.shards), "compute": float(stats[1]) / b.shards / wall,
                "io": 0.0, "note": "bytes: ring all-reduce estimate; compute includes the all-reduce"}))
    finally:
        dist.destroy_process_group()


def run_ddp(b: Budget) -> dict[str, Any]:
    import torch.multiprocessing as mp

    from pipeline.client.processes import free_port

    with tempfile.TemporaryDirectory(prefix="aas-bench-ddp-") as d:
        out = str(Path(d) / "rank0.json")
        mp.spawn(_ddp_rank, args=(b, free_port(), out), nprocs=b.shards, join=True)
        return dict(json.loads(Path(out).read_text()))


# ------------------------------------------------------------------ the pipeline (rows c–g)

REGISTRY_TOKEN = secrets.token_hex(16)  # per run


@dataclass
class Cluster:
    """An embedded Redis, a local-folder store, shard workers and one aggregator as real processes."""

    workdir: Path
    shards: int
    slow_worker: bool = False
    settings: Any = None
    group: Any = None
    redis: Any = None
    procs: list[str] = field(default_factory=list)

    def __enter__(self) -> Cluster:
        from pipeline.client.processes import EmbeddedRedis, ProcessGroup, wait_for_workers
        from pipeline.settings import Settings
        from workers.app import QUEUE_AGGREGATE, QUEUE_SHARDS, app_for

        self.redis = EmbeddedRedis(self.workdir / "redis")
        store = self.workdir / "store"
        env = {**os.environ, "AAS_REDIS_URL": self.redis.url, "AAS_STORE_ROOT": str(store),
               "AAS_TORCH_THREADS": "1", "AAS_SLOW_FACTOR": "1", "AAS_INSECURE_DEV": "1",
               # Every row registers into the same model: the bench is its operator and holds the token.
               "AAS_REGISTRY_TOKEN": REGISTRY_TOKEN,
               "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
        self.settings = Settings(redis_url=self.redis.url, store_root=store, torch_threads=1,
                                 registry_token=REGISTRY_TOKEN, insecure_dev=True)
        self.group = ProcessGroup(env=env, cwd=REPO, logdir=self.workdir / "logs")
        names = [f"shard{i}" for i in range(self.shards)]
        for i, n in enumerate(names):
            slow = {"AAS_SLOW_FACTOR": str(SLOW_FACTOR)} if self.slow_worker and i == 0 else None
            self.group.start_worker(n, QUEUE_SHARDS, slow)
        self.group.start_worker("aggregator", QUEUE_AGGREGATE)
        self.procs = [*names, "aggregator"]
        wait_for_workers(app_for(self.settings), self.procs, timeout_s=180)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.group is not None:
            self.group.close()
        if self.redis is not None:
            self.redis.close()

    def warm_up(self, spec: dict[str, Any], versions: int = 2, timeout_s: float = 300.0) -> None:
        """Run `spec` until it commits `versions` versions, cancel it, and wait until no task of it runs."""
        from pipeline.client import Client
        from storage.leases import LeaseBook

        client = Client(self.settings)
        job_id = client.submit(spec)
        deadline = time.monotonic() + timeout_s
        while (job := client.jobs.get(job_id)).version < versions and job.status in ("queued", "running"):
            if time.monotonic() > deadline:
                raise TimeoutError(f"warm-up job {job_id} did not reach v{versions} in {timeout_s} s")
            time.sleep(0.05)
        client.cancel(job_id)
        book = LeaseBook(client.redis, self.settings.lease_ttl_s)
        while any(lease.alive for lease in book.leases(job_id)) and time.monotonic() < deadline:
            time.sleep(0.05)  # its tasks in flight see the cancel and end

    def run(self, spec: dict[str, Any], timeout_s: float) -> dict[str, Any]:
        from pipeline.client import Client
        from workers.app import app_for

        client = Client(self.settings)
        t0 = time.time()
        job_id = client.submit(spec)
        try:
            final = client.wait(job_id, timeout=timeout_s, poll_s=0.05)
        except TimeoutError:
            client.cancel(job_id)
            app_for(self.settings).control.purge()
            raise
        if final["status"] != "succeeded":
            raise RuntimeError(f"job {job_id} {final['status']}: {final.get('error')}")
        wall = float(final.get("finished_at", time.time())) - t0  # from submit (data staging included)
        metrics = final["metrics"]
        last = metrics[-1] if metrics else {}
        compute, io, tasks = shard_task_times(client.redis, job_id)
        busy = wall * self.shards
        # To the last version's commit: the final evaluation and registration after it are left out, as DDP's
        # row leaves its final evaluation out of its time.
        train_wall = float(last.get("t", time.time())) - t0
        return {"samples": sum(int(m.get("samples", 0)) for m in metrics), "wall_s": wall, "train_wall_s": train_wall,
                "accuracy": last.get("accuracy"), "perplexity": last.get("perplexity"), "loss": last.get("loss"),
                "bytes": final["bytes_up"] + final["bytes_down"], "compute": compute / busy, "io": io / busy,
                "agg": sum(float(m.get("round_s", 0)) for m in metrics) / wall,
                "note": f"{final['version']} versions, {tasks} shard tasks{staleness_note(metrics)}",
                # samples/s and the checkpoint write's mean seconds in each quarter of the versions: whether a long
                # job slows down as it goes, and whether its writes do
                **pace(metrics, t0),
                # each version's training loss (and, async, its updates' mean staleness): where a run went astray;
                # then its commit time and checkpoint write seconds
                "curve": [[m.get("version"), m.get("train_loss"), m.get("staleness_mean"), m.get("t"),
                           m.get("write_s")] for m in metrics]}


def pace(metrics: list[dict[str, Any]], t0: float, parts: int = 4) -> dict[str, list[float]]:
    """Samples/s and mean checkpoint-write seconds over each of `parts` equal runs of versions (by commit time
    ``t`` from `t0`, the submit); empty lists when the metrics carry no times."""
    timed = [m for m in metrics if m.get("t") is not None]
    if len(timed) < parts:
        return {"pace": [], "write_s": []}
    rate, write = [], []
    start = t0
    for i in range(parts):
        chunk = timed[i * len(timed) // parts:(i + 1) * len(timed) // parts]
        end = float(chunk[-1]["t"])
        rate.append(round(sum(int(m.get("samples", 0)) for m in chunk) / max(end - start, 1e-9), 1))
        write.append(round(sum(float(m.get("write_s", 0)) for m in chunk) / len(chunk), 4))
        start = end
    return {"pace": rate, "write_s": write}


def staleness_note(metrics: list[dict[str, Any]]) -> str:
    """Async: the updates' mean staleness (versions behind when applied), weighted by updates per version."""
    per = [(float(m["staleness_mean"]), int(m.get("updates", 1))) for m in metrics if "staleness_mean" in m]
    n = sum(u for _, u in per)
    return f", staleness {sum(s * u for s, u in per) / n:.2f}" if n else ""


def shard_task_times(r: Any, job_id: str) -> tuple[float, float, int]:
    """Σ compute_s, Σ io_s and the count of this job's shard task results (``storage.leases.shard_results``)."""
    from storage.leases import shard_results

    done = [res for res in shard_results(r, job_id) if "compute_s" in res]
    return (sum(float(res["compute_s"]) for res in done), sum(float(res.get("io_s", 0.0)) for res in done),
            len(done))


# ------------------------------------------------------------------ rows, table, entry point


def pipeline_rows(b: Budget, workdir: Path) -> list[tuple[str, str, bool, Callable[[Cluster], dict[str, Any]]]]:
    t = b.row_timeout_s
    return [
        ("c", "pipeline sync", False, lambda c: c.run(b.spec(mode="sync", **b.sync_spec), t)),
        ("d", "pipeline async", False, lambda c: c.run(b.spec(mode="async", **b.async_spec), t)),
        ("e", f"pipeline sync H={b.local_steps}", False,
         lambda c: c.run(b.spec(local_steps=b.local_steps, **b.sync_spec), t)),
        ("f", f"async, 1 worker {SLOW_FACTOR}× slower", True,
         lambda c: c.run(b.spec(mode="async", **b.async_spec), t)),
        ("g", f"sync, 1 worker {SLOW_FACTOR}× slower", True, lambda c: c.run(b.spec(mode="sync", **b.sync_spec), t)),
    ]


def guarded(row: str, label: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    print(f"[bench] {row}: {label} ...", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    try:
        out = {"row": row, "label": label, **fn()}
    except BaseException as e:  # noqa: BLE001 - a failing row is reported, the others still run
        if isinstance(e, KeyboardInterrupt):
            raise
        traceback.print_exc(file=sys.stderr)
        out = {"row": row, "label": label, "error": f"{type(e).__name__}: {e}".splitlines()[0][:200]}
    print(f"[bench] {row}: done in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    return out


def run_all(b: Budget, only: set[str] | None, cold: bool = False) -> list[dict[str, Any]]:
    rows = [guarded("a", "single process", lambda: run_reference(b)) if not only or "a" in only else None,
            guarded("b", f"DDP gloo ×{b.shards}", lambda: run_ddp(b)) if not only or "b" in only else None]
    with tempfile.TemporaryDirectory(prefix="aas-bench-train-") as d:
        for slow in (False, True):
            todo = [r for r in pipeline_rows(b, Path(d)) if r[2] == slow and (not only or r[0] in only)]
            if not todo:
                continue
            try:
                with Cluster(Path(d) / ("slow" if slow else "even"), b.shards, slow_worker=slow) as cluster:
                    if not cold:
                        print("[bench] warming the workers up ...", file=sys.stderr, flush=True)
                        cluster.warm_up(b.spec(mode="sync", **b.sync_spec))
                    rows += [guarded(r, label, lambda fn=fn: fn(cluster)) for r, label, _, fn in todo]
            except Exception as e:  # noqa: BLE001 - the cluster failed to start: each of its rows says so
                rows += [{"row": r, "label": label, "error": f"cluster: {type(e).__name__}: {e}"[:200]}
                         for r, label, _, _ in todo]
    return sorted((r for r in rows if r is not None), key=lambda r: r["row"])


def markdown(rows: list[dict[str, Any]], b: Budget) -> str:
    metric = "test ppl" if b.task == "lm" else "test acc"
    head = (f"| row | setup | samples/s | to last version | wall s | {metric} | bytes moved | compute/io/other % "
            "| agg % | notes |")
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['row']} | {r['label']} | error: {r['error']} | | | | | | | |")
            continue
        value = r.get("perplexity") if b.task == "lm" else r.get("accuracy")
        shares = f"{100 * r['compute']:.0f}/{100 * r['io']:.0f}/{100 * max(0.0, 1 - r['compute'] - r['io']):.0f}"
        agg = f"{100 * r['agg']:.0f}" if "agg" in r else "–"
        to_last = f"{r['samples'] / r['train_wall_s']:.0f}" if r.get("train_wall_s") else "–"
        lines.append(f"| {r['row']} | {r['label']} | {r['samples'] / r['wall_s']:.0f} | {to_last} | "
                     f"{r['wall_s']:.1f} | {value:.4g} | {r['bytes'] / 1e6:.1f} MB | {shares} | {agg} | "
                     f"{r.get('note', '')} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a small budget: about 2–3 minutes on 2 CPU cores")
    ap.add_argument("--model", default="char-lm", choices=["char-lm", "digits-cnn"])
    ap.add_argument("--rows", default="", help="only these rows, e.g. 'abce' (default: all)")
    ap.add_argument("--cold", action="store_true", help="no warm-up job: time each cluster's first job from cold")
    ap.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    ap.add_argument("--async-spec", default="{}", type=json.loads, metavar="JSON",
                    help='spec fields for the async rows only, e.g. \'{"delay_compensation": 0}\' (default: none)')
    ap.add_argument("--sync-spec", default="{}", type=json.loads, metavar="JSON",
                    help='spec fields for the sync pipeline rows only, e.g. \'{"checkpoint_every_versions": 16}\'')
    ap.add_argument("--spec", default="{}", type=json.loads, metavar="JSON",
                    help='spec fields for every pipeline row, sync and async, e.g. \'{"lr_schedule": "cosine"}\'')
    ap.add_argument("--epochs", type=int, default=0, help="epochs of every row (default: the budget's)")
    ap.add_argument("--seed", type=int, default=0, help="the job seed: initial weights and data order (default 0)")
    args = ap.parse_args(argv)
    b = budget_for(args.model, args.quick)
    epochs = args.epochs or b.epochs
    b = replace(b, async_spec=args.async_spec, sync_spec=args.sync_spec, common_spec=args.spec, epochs=epochs,
                seed=args.seed, row_timeout_s=b.row_timeout_s * max(1.0, epochs / b.epochs))
    t0 = time.perf_counter()
    rows = run_all(b, set(args.rows) or None, cold=args.cold)
    table = markdown(rows, b)
    row = b.spec()  # the budget's fields under --spec's
    print(f"\n{args.model}: {b.shards} shards × batch {b.batch_size}, {b.epochs} epoch(s), SGD lr {row['lr']} "
          f"momentum {row['momentum']}; H={b.local_steps} row: inner SGD lr {row['inner_lr']}, outer Nesterov "
          "(spec defaults); "
          f"{os.cpu_count()} CPUs, torch {torch.__version__}; pipeline rows on "
          f"{'a cold cluster' if args.cold else 'warm workers'}")
    for what, fields in (("every pipeline row", b.common_spec), ("sync rows", b.sync_spec),
                         ("async rows", b.async_spec)):
        if fields:  # over the budget's (an lr set here is the one the rows trained with)
            print(f"spec fields for {what}: {json.dumps(fields)}")
    print()
    print(table)
    paced = [r for r in rows if r.get("pace")]
    if paced:
        print("\nper quarter of each pipeline job's versions: samples/s | mean checkpoint write (ms)")
        for r in paced:
            print(f"  {r['row']}: {' '.join(f'{p:.0f}' for p in r['pace'])} | "
                  f"{' '.join(f'{1000 * w:.1f}' for w in r['write_s'])}")
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "budget": asdict(b), "warm_workers": not args.cold,
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                        "python": platform.python_version()},
            "rows": rows}, indent=2, default=str))
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
