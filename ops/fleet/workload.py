"""What the fleet benchmark trains: one model, data set and step budget shared by DDP and every pipeline mode.

The budget is in steps per worker (`steps`): every worker walks exactly the mini-batches
``pipeline.data.batch_rows`` gives its shard, so DDP, the single-process reference and the pipeline see
the same samples. One epoch of the shard is exactly `steps` batches (max_chars is sized for it).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

TEST_WINDOWS = 64


@dataclass(frozen=True)
class Workload:
    """char-lm (≥ 10M parameters at the defaults) on the chars corpus, `workers` shards × `batch` per step."""

    n_embd: int = 384
    n_layer: int = 6
    n_head: int = 6
    block_size: int = 32
    batch: int = 4  # per worker and step
    steps: int = 128  # per worker: one epoch of its shard
    workers: int = 2
    seed: int = 0
    sgd_lr: float = 0.1  # the pipeline's sync rounds (its aggregator's optimizer is SGD with momentum)
    sgd_momentum: float = 0.9
    adamw_lr: float = 1e-3  # DDP's optimizer and DiLoCo's inner one (Douillard et al. 2023)
    outer_lr: float = 0.7
    outer_momentum: float = 0.9
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def model_args(self) -> dict[str, Any]:
        return {"n_embd": self.n_embd, "n_layer": self.n_layer, "n_head": self.n_head, "block_size": self.block_size}

    @property
    def dataset_args(self) -> dict[str, Any]:
        windows = self.workers * self.steps * self.batch + TEST_WINDOWS  # train windows + the test split
        assert windows // 5 >= TEST_WINDOWS, "too few windows for a 64-window test split"
        return {"block_size": self.block_size, "max_chars": windows * self.block_size + 1}

    def spec(self, *, local_steps: int = 1, codec: str = "none") -> dict[str, Any]:
        """The pipeline job: sync SGD (H=1) or DiLoCo (AdamW inner, Nesterov outer) over the same budget."""
        return {"model": "char-lm", "model_args": self.model_args, "dataset": "chars",
                "dataset_args": self.dataset_args, "shards": self.workers, "batch_size": self.batch, "epochs": 1,
                "lr": self.sgd_lr, "momentum": self.sgd_momentum, "local_steps": local_steps,
                "inner_optimizer": "adamw", "inner_lr": self.adamw_lr, "outer_lr": self.outer_lr,
                "outer_momentum": self.outer_momentum, "codec": codec, "seed": self.seed,
                "publish_every_versions": 0, "promote": None, **self.extra}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def load(w: Workload) -> Any:
    from pipeline.data import load_dataset

    return load_dataset("chars", w.dataset_args)


def initial_model(w: Workload) -> torch.nn.Module:
    from pipeline.checkpoint import initial_checkpoint

    return initial_checkpoint("char-lm", w.model_args, w.seed).build()  # the pipeline's version 0


def worker_batches(ds: Any, w: Workload, rank: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Worker `rank`'s mini-batches, step by step: exactly those of the pipeline's shard `rank`."""
    from pipeline.data import batch_rows, batches_per_epoch, shard_indices

    parts = shard_indices(ds.n_train, w.workers, w.seed)
    sizes = [int(p.numel()) for p in parts]
    bpe = batches_per_epoch(sizes, w.batch)
    x, y = ds.x_train[parts[rank]], ds.y_train[parts[rank]]
    out = []
    for step in range(w.steps):
        rows = batch_rows(sizes[rank], w.batch, step, bpe, w.seed, rank)
        out.append((x[rows], y[rows]))
    return out


def perplexity(model: torch.nn.Module, ds: Any) -> float:
    from pipeline.training import evaluate

    return float(evaluate(model, ds.x_test, ds.y_test, "lm")["perplexity"])


def reference_adamw(w: Workload, threads: int = 1) -> dict[str, Any]:
    """One process, AdamW on the union of every worker's step-k batch: DDP's math, without a network.

    One torch thread by default: on a machine with more runnable processes than cores, OpenMP's
    spin-waiting threads made the two-thread loop many times slower than one thread."""
    from pipeline.training import loss_fn

    torch.set_num_threads(threads)
    ds = load(w)
    model = initial_model(w)
    opt = torch.optim.AdamW(model.parameters(), lr=w.adamw_lr, weight_decay=0.0)
    per_worker = [worker_batches(ds, w, r) for r in range(w.workers)]
    t0 = time.perf_counter()
    model.train()
    for step in range(w.steps):
        xb = torch.cat([b[step][0] for b in per_worker])
        yb = torch.cat([b[step][1] for b in per_worker])
        loss = loss_fn(model(xb), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return {"perplexity": perplexity(model, ds), "wall_s": time.perf_counter() - t0,
            "samples": w.steps * w.batch * w.workers}
