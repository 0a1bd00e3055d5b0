"""One DDP rank (gloo) on a fleet host: the benchmark's baseline, over the same limited link as a shard worker.

    python -m ops.fleet.ddp_rank --rank R --master ADDR:PORT --workload JSON --cap-s S --out FILE

Every rank trains the same model from the pipeline's version 0 on exactly its shard's mini-batches
(AdamW; DDP all-reduces the gradient mean inside backward). The run stops after the workload's steps, or
earlier when rank 0 has spent `cap_s` seconds (all ranks agree through the per-step flag), so a link too
slow to finish in time still gives a steady-state rate. Compute share: a calibration step under
``no_sync()`` (forward and backward, no all-reduce) before the timed loop gives the compute time of one
step; steps × that over the wall time is the share of time spent computing.
"""

from __future__ import annotations

import argparse
import datetime
import json
import time
from pathlib import Path

import torch


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rank", type=int, required=True)
    ap.add_argument("--master", required=True, help="rank 0's ADDR:PORT on the fleet")
    ap.add_argument("--workload", required=True, help="Workload as JSON")
    ap.add_argument("--cap-s", type=float, default=60.0)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from ops.fleet.workload import Workload, initial_model, load, perplexity, worker_batches
    from pipeline.training import loss_fn

    w = Workload(**json.loads(args.workload))
    torch.set_num_threads(1)  # one core per worker, as the pipeline's shard workers get
    dist.init_process_group("gloo", init_method=f"tcp://{args.master}", rank=args.rank, world_size=w.workers,
                            timeout=datetime.timedelta(seconds=600))
    try:
        ds = load(w)
        batches = worker_batches(ds, w, args.rank)
        model = DistributedDataParallel(initial_model(w))
        opt = torch.optim.AdamW(model.parameters(), lr=w.adamw_lr, weight_decay=0.0)
        calib = []
        for x, y in batches[:2]:  # compute time of one step, no all-reduce (the second is the steady one)
            t = time.perf_counter()
            with model.no_sync():
                loss_fn(model(x), y).backward()
            calib.append(time.perf_counter() - t)
        opt.zero_grad(set_to_none=True)
        step_compute_s = calib[-1]
        dist.barrier()
        t0 = time.perf_counter()
        steps = samples = 0
        go = torch.ones(1)
        for x, y in batches:
            loss = loss_fn(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()  # gradients are all-reduced (mean over ranks) here
            opt.step()
            steps += 1
            samples += int(x.shape[0])
            go.fill_(0.0 if args.rank == 0 and time.perf_counter() - t0 > args.cap_s else 1.0)
            dist.all_reduce(go, op=dist.ReduceOp.MIN)  # 4 bytes: every rank stops at the same step
            if go.item() == 0.0:
                break
        wall = time.perf_counter() - t0
        stats = torch.tensor([samples, steps * step_compute_s], dtype=torch.float64)
        dist.all_reduce(stats)
        if args.rank == 0:
            done = steps == len(batches)
            Path(args.out).write_text(json.dumps({
                "samples": int(stats[0]), "wall_s": wall, "steps": steps, "complete": done,
                "compute": float(stats[1]) / w.workers / wall, "step_compute_s": step_compute_s,
                "perplexity": perplexity(model.module, ds) if done else None}))
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
