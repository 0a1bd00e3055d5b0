"""The fleet workload's DiLoCo and DDP math in one process, no network: for choosing H and the outer optimizer.

    python -m ops.fleet.sweep ddp    --steps 256 --batch 16 [--every 64]
    python -m ops.fleet.sweep diloco --steps 256 --batch 16 --local-steps 32 --outer-lr 1.0 --outer-momentum 0.0

``ddp`` is the benchmark's reference (``reference_adamw``: AdamW on the union of every worker's step-k batch),
printing the test perplexity every `--every` steps. ``diloco`` runs what the pipeline's DiLoCo rounds compute,
with the pipeline's own functions: each worker's H AdamW steps from the round's weights
(``pipeline.training.local_steps``, a fresh inner optimizer every round, as a shard task has by default;
``--keep-inner``: each worker's AdamW state kept from its round to its next, as ``inner_state="keep"``), the
sample-weighted mean Δ, and the aggregator's outer step (``pipeline.aggregate.sgd_step``, Nesterov), printing
the perplexity after every outer step. Same model, initialisation, mini-batches and test split as
``ops/fleet/run bench`` with the same --steps and --batch; the fleet adds only the network, the store and
the int8 coding of Δ when a row asks for it. One torch thread, like a shard worker.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import replace

import torch

from ops.fleet.workload import Workload, initial_model, load, perplexity, worker_batches


def diloco(w: Workload, local_steps: int, on_round: Callable[[str], None] | None = None,
           keep_inner: bool = False) -> list[float]:
    """Perplexity after each outer step of `w.steps // local_steps` DiLoCo rounds."""
    from pipeline.aggregate import Update, sgd_step, weighted_mean
    from pipeline.training import local_steps as inner_steps
    from pipeline.training import trainable

    ds = load(w)
    model = initial_model(w)
    per_worker = [worker_batches(ds, w, r) for r in range(w.workers)]
    bufs: dict[str, torch.Tensor] = {}
    inner: list[dict[str, torch.Tensor] | None] = [None] * w.workers
    out = []
    for k in range(w.steps // local_steps):
        updates = []
        for r, batches in enumerate(per_worker):
            res = inner_steps(model, batches[k * local_steps:(k + 1) * local_steps], optimizer="adamw", lr=w.adamw_lr,
                              state=inner[r], keep_state=keep_inner)
            inner[r] = res.inner_state
            updates.append(Update(f"sweep/{r}/{k}", r, res.update, res.samples, res.loss))
        mean, _, _ = weighted_mean(updates)
        params = {n: p.detach().clone() for n, p in trainable(model).items()}
        new, bufs = sgd_step(params, mean, bufs, lr=w.outer_lr, momentum=w.outer_momentum, nesterov=True)
        with torch.no_grad():
            for n, p in trainable(model).items():
                p.copy_(new[n])
        out.append(perplexity(model, ds))
        if on_round is not None:
            on_round(f"outer step {k + 1}: {(k + 1) * local_steps} steps per worker, test ppl {out[-1]:.3f}")
    return out


def ddp(w: Workload, every: int, on_eval: Callable[[str], None] | None = None) -> list[float]:
    """DDP's math (the bench's reference): test perplexity every `every` steps."""
    from pipeline.training import loss_fn

    ds = load(w)
    model = initial_model(w)
    opt = torch.optim.AdamW(model.parameters(), lr=w.adamw_lr, weight_decay=0.0)
    per_worker = [worker_batches(ds, w, r) for r in range(w.workers)]
    out = []
    for step in range(w.steps):
        model.train()
        xb = torch.cat([b[step][0] for b in per_worker])  # (workers × batch, T)
        yb = torch.cat([b[step][1] for b in per_worker])
        loss = loss_fn(model(xb), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (step + 1) % every == 0 or step + 1 == w.steps:
            out.append(perplexity(model, ds))
            if on_eval is not None:
                on_eval(f"step {step + 1}: test ppl {out[-1]:.3f}")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=("ddp", "diloco"))
    ap.add_argument("--steps", type=int, default=Workload.steps, help="steps per worker")
    ap.add_argument("--batch", type=int, default=Workload.batch, help="samples per worker and step")
    ap.add_argument("--local-steps", type=int, default=32, help="H (diloco)")
    ap.add_argument("--outer-lr", type=float, default=Workload.outer_lr)
    ap.add_argument("--outer-momentum", type=float, default=Workload.outer_momentum)
    ap.add_argument("--every", type=int, default=64, help="evaluate every this many steps (ddp)")
    ap.add_argument("--keep-inner", action="store_true", help="keep each worker's inner AdamW state (diloco)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    w = replace(Workload(), steps=args.steps, batch=args.batch, outer_lr=args.outer_lr,
                outer_momentum=args.outer_momentum)
    t0 = time.perf_counter()
    if args.what == "ddp":
        ddp(w, args.every, on_eval=lambda s: print(s, flush=True))
    else:
        diloco(w, args.local_steps, on_round=lambda s: print(s, flush=True), keep_inner=args.keep_inner)
    print(f"{time.perf_counter() - t0:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
