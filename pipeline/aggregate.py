"""Aggregator math: verify the set of updates, weighted mean, optimizer step, staleness rule.

Pure functions on dicts of tensors. ``w_new = w_old − η · Σ_i (n_i / Σn) · g_i`` with optional
(Nesterov) momentum, matching ``torch.optim.SGD`` step for step, so a checkpoint's momentum buffers
mean the same as PyTorch's.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from pipeline.reasons import Refusal

Tensors = dict[str, torch.Tensor]


class UpdateRejected(Refusal):
    """An update that must not be applied (NaN/Inf, wrong shapes, wrong identity). Names the reason."""


@dataclass(frozen=True)
class Update:
    identity: str  # job/shard/base version/attempt
    shard: int
    tensors: Tensors
    samples: int
    loss: float


def check_update(update: Mapping[str, torch.Tensor], params: Mapping[str, torch.Tensor], where: str) -> None:
    """Reject an update whose names or shapes differ from the model's, or that holds NaN/Inf."""
    missing = sorted(set(params) - set(update))
    extra = sorted(set(update) - set(params))
    if missing or extra:
        raise UpdateRejected(f"{where}: tensor names differ from the model (missing {missing[:3]}, extra {extra[:3]})",
                             code="shape")
    for name, t in update.items():
        if tuple(t.shape) != tuple(params[name].shape):
            raise UpdateRejected(
                f"{where}: {name} has shape {tuple(t.shape)}, the model has {tuple(params[name].shape)}", code="shape"
            )
        if not torch.isfinite(t).all():
            raise UpdateRejected(f"{where}: {name} contains NaN or Inf", code="nonfinite")


def weighted_mean(updates: Sequence[Update]) -> tuple[Tensors, int, float]:
    """Sample-weighted mean of the updates; returns (mean, total samples, weighted mean loss)."""
    total = sum(u.samples for u in updates)
    if total <= 0:
        raise UpdateRejected("no samples in this round's updates")
    names = updates[0].tensors.keys()
    mean = {n: sum(u.tensors[n].double() * (u.samples / total) for u in updates).float() for n in names}
    loss = sum(u.loss * u.samples for u in updates) / total
    return mean, total, loss


def sgd_step(
    params: Tensors,
    grads: Tensors,
    momentum_buffers: Tensors,
    *,
    lr: float,
    momentum: float = 0.0,
    nesterov: bool = False,
    weight_decay: float = 0.0,
) -> tuple[Tensors, Tensors]:
    """One step of SGD exactly as torch.optim.SGD computes it. Returns (new params, new buffers)."""
    new_params: Tensors = {}
    new_bufs: Tensors = {}
    for name, p in params.items():
        g = grads[name]
        if weight_decay:
            g = g + weight_decay * p
        if momentum:
            buf = momentum_buffers.get(name)
            buf = g.clone() if buf is None else buf * momentum + g
            new_bufs[name] = buf
            g = g + momentum * buf if nesterov else buf
        new_params[name] = p - lr * g
    return new_params, new_bufs


def staleness_lr(lr: float, staleness: int, rule: str) -> float:
    """Learning rate for an update computed `staleness` versions ago (Zhang et al. 2016: η/(1+s))."""
    if staleness < 0:
        raise UpdateRejected(f"update from a future version (staleness {staleness})", code="stale")
    return lr / (1 + staleness) if rule == "inverse" else lr


def select_round(
    results: Sequence[Mapping[str, object]], expected_shards: Sequence[int]
) -> tuple[dict[int, Mapping[str, object]], list[int]]:
    """Pick one result per expected shard from a chord's results; return (by shard, missing shards).

    A chord counts completions, not shards: redelivery can give one shard twice and another none.
    Duplicates are dropped here; the caller must find or recompute every missing shard.
    """
    by_shard: dict[int, Mapping[str, object]] = {}
    for r in results:
        if not isinstance(r, Mapping) or "shard" not in r:
            continue
        s = int(r["shard"])  # type: ignore[call-overload]
        if s in expected_shards and s not in by_shard:
            by_shard[s] = r
    missing = [s for s in expected_shards if s not in by_shard]
    return by_shard, missing
