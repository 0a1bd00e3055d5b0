"""Async mode's math on a simulated clock, in one process: which settings keep it close to sync with stragglers.

The pipeline's async job (``workers/async_agg.py``, ``pipeline/async_plan.py``) replayed without Celery, Redis or
the store: the same global order of steps (one per shard in flight), each step's gradient computed on the newest
version when a worker takes it (or on its weight prediction, ``weight_prediction``), results applied in the order
a clock with one worker ``--slow`` times slower than the others delivers them, every ``publish_every`` accepted
updates one optimizer step (``pipeline.aggregate``: staleness weights, delay compensation, staleness momentum,
the lr schedule). The sync row is the same data and optimizer with a barrier. Deterministic, so a setting's
effect is not hidden by run-to-run timing noise (the real pipeline's order depends on the machine's timing:
``ops/bench/run training --rows fg`` measures that).

    ops/bench/run async_sim [--quick] [--epochs N] [--seeds 0,1] [--slow 3] \\
        [--settings '{"default": {}, "dc8-sm1": {"delay_compensation": 8, "staleness_momentum": 1}}']
"""

from __future__ import annotations

import argparse
import heapq
import json
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from training import budget_for, final_metric, initial_model, shard_plan  # noqa: E402  (sibling bench module)

from pipeline.aggregate import (
    Accumulator,
    Update,
    delay_compensated,
    predict_weights_,
    sgd_step_,
    staleness_lr,
    staleness_momentum,
)
from pipeline.async_plan import accept, frontier
from pipeline.data import batch_rows, load_dataset
from pipeline.spec import JobSpec
from pipeline.training import gradient
from workers.aggregator import opt_hparams


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _load(model: torch.nn.Module, params: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(params[n])


def run(spec: JobSpec, b: Any, ds: Any, *, slow: float, workers: int) -> dict[str, Any]:
    """One job of `spec` (sync or async) on a simulated clock; returns its test metric and its staleness."""
    parts, sizes, bpe = shard_plan(ds.n_train, b)
    xs = [ds.x_train[p] for p in parts]
    ys = [ds.y_train[p] for p in parts]
    steps_per_shard = b.epochs * bpe
    rounds = steps_per_shard
    model = initial_model(b)
    params = _state(model)
    bufs: dict[str, torch.Tensor] = {}

    def grad_at(weights: dict[str, torch.Tensor], shard: int, step: int) -> Any:
        _load(model, weights)
        model.train()
        rows = batch_rows(sizes[shard], b.batch_size, step, bpe, b.seed, shard)
        return gradient(model, xs[shard][rows], ys[shard][rows])

    if spec.mode == "sync":
        for v in range(rounds):
            acc = Accumulator({n: tuple(t.shape) for n, t in params.items()})
            for s in range(b.shards):
                r = grad_at(params, s, v)
                acc.add(Update(f"{s}/{v}", s, r.update, r.samples, r.loss))
            mean, _, _ = acc.mean()
            sgd_step_(params, mean, bufs, **opt_hparams(spec, v, rounds))
        _load(model, params)
        return {**final_metric(model, ds, b), "versions": rounds, "staleness": 0.0}

    budget = b.shards * rounds
    total = -(-budget // spec.publish_every)
    version, history = 0, {0: {n: t.clone() for n, t in params.items()}}
    marks: dict[int, int] = {}
    ahead: set[tuple[int, int]] = set()
    issued: set[tuple[int, int]] = set()
    mean_square: dict[str, torch.Tensor] = {}
    pending: list[tuple[Any, int, int]] = []  # (result, base version, staleness)
    events: list[tuple[float, int, int, int, int, Any]] = []  # (finish time, seq, worker, shard, step, (result, base))
    free = list(range(workers))  # worker 0 is the slow one
    clock, seq, accepted, stale_all = 0.0, 0, 0, []

    def issue() -> None:
        nonlocal seq
        for s, k in frontier(marks, ahead, shards=b.shards, local_steps=1, steps_per_shard=steps_per_shard,
                             lookahead=True, workers=workers):
            if (s, k) in issued or not free:
                continue
            w = free.pop(0)
            issued.add((s, k))
            at = params
            if spec.weight_prediction and version > 0 and bufs:  # as workers/shard.py predicted_model
                at = {n: t.clone() for n, t in params.items()}
                predict_weights_(at, bufs, lr=opt_hparams(spec, version - 1, total)["lr"], steps=spec.weight_prediction)
            r = grad_at(at, s, k)
            heapq.heappush(events, (clock + (slow if w == 0 else 1.0), seq, w, s, k, (r, version)))
            seq += 1

    issue()
    while events:
        clock, _, w, s, k, (r, base) = heapq.heappop(events)
        free.append(w)
        free.sort()
        staleness = version - base
        if staleness > spec.max_staleness:
            issued.discard((s, k))
        else:
            m, rest = accept(marks.get(s, 0), {a for (sh, a) in ahead if sh == s}, k, 1)
            marks[s] = m
            ahead = {(sh, a) for (sh, a) in ahead if sh != s} | {(s, a) for a in rest}
            pending.append((r, base, staleness))
            accepted += 1
        if len(pending) >= spec.publish_every or (accepted >= budget and pending):
            acc = Accumulator({n: tuple(t.shape) for n, t in params.items()})
            for res, bv, st in pending:
                tensors = res.update
                if spec.delay_compensation:
                    tensors = delay_compensated(tensors, params, history[bv], mean_square, spec.delay_compensation)
                scale = staleness_lr(1.0, st, spec.staleness_rule)
                for n, t in tensors.items():
                    acc.fold(n, 0, t.reshape(-1), scale * res.samples)
                acc.samples += res.samples
            mean, _, _ = acc.mean()
            hp = opt_hparams(spec, version, total)
            hp["momentum"] = staleness_momentum(hp["momentum"], [st for _, _, st in pending], spec.staleness_momentum)
            sgd_step_(params, mean, bufs, **hp)
            stale_all += [st for _, _, st in pending]
            pending = []
            version += 1
            history[version] = {n: t.clone() for n, t in params.items()}
            history.pop(version - spec.max_staleness - 2, None)
        issue()
    _load(model, params)
    return {**final_metric(model, ds, b), "versions": version, "staleness": sum(stale_all) / max(1, len(stale_all))}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="char-lm", choices=["char-lm", "digits-cnn"])
    ap.add_argument("--quick", action="store_true", help="the training bench's quick budget")
    ap.add_argument("--epochs", type=int, default=0)
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--slow", type=float, default=3.0, help="worker 0 takes this many times as long (default 3)")
    ap.add_argument("--spec", default="{}", type=json.loads, help="spec fields for every row, sync and async")
    ap.add_argument("--settings", default='{"defaults": {}}', type=json.loads,
                    help="async rows: name → spec fields (default: one row at the spec's defaults)")
    ap.add_argument("--json", metavar="FILE")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    b0 = budget_for(args.model, args.quick)
    b0 = replace(b0, epochs=args.epochs or b0.epochs)
    metric = "perplexity" if b0.task == "lm" else "accuracy"
    rows = []
    print(f"{args.model}, {b0.epochs} epoch(s), {b0.shards} shards × batch {b0.batch_size}, lr "
          f"{args.spec.get('lr', b0.lr)} momentum {args.spec.get('momentum', b0.momentum)}, one worker {args.slow}× "
          f"slower; spec {args.spec}\n")
    print(f"| seed | row | {metric} | Δ vs sync | staleness | s |\n|---:|---|---:|---:|---:|---:|")
    for seed in [int(s) for s in args.seeds.split(",")]:
        b = replace(b0, seed=seed)
        ds = load_dataset(b.dataset, b.dataset_args)
        base = {"model": b.model, "model_args": b.model_args, "dataset": b.dataset, "dataset_args": b.dataset_args,
                "shards": b.shards, "batch_size": b.batch_size, "epochs": b.epochs, "lr": b.lr,
                "momentum": b.momentum, "seed": seed, **args.spec}
        t0 = time.perf_counter()
        sync = run(JobSpec.model_validate({**base, "mode": "sync"}), b, ds, slow=args.slow, workers=b.shards)
        ref = float(sync[metric])
        print(f"| {seed} | sync | {ref:.4f} | – | 0 | {time.perf_counter() - t0:.0f} |", flush=True)
        rows.append({"seed": seed, "row": "sync", **sync})
        for name, fields in args.settings.items():
            t0 = time.perf_counter()
            spec = JobSpec.model_validate({**base, "mode": "async", "publish_every": b.shards, **fields})
            out = run(spec, b, ds, slow=args.slow, workers=b.shards)
            delta = (float(out[metric]) / ref - 1) * 100 if metric == "perplexity" else (float(out[metric]) - ref) * 100
            unit = "%" if metric == "perplexity" else " pts"
            print(f"| {seed} | {name} | {float(out[metric]):.4f} | {delta:+.1f}{unit} | {out['staleness']:.2f} | "
                  f"{time.perf_counter() - t0:.0f} |", flush=True)
            rows.append({"seed": seed, "row": name, "fields": fields, **out})
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
