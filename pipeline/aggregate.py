"""Aggregator math: verify the set of updates, weighted mean, optimizer step, staleness rule.

Pure functions on dicts of tensors. ``w_new = w_old − η · Σ_i (n_i / Σn) · g_i`` with optional
(Nesterov) momentum, matching ``torch.optim.SGD`` step for step, so a checkpoint's momentum buffers
mean the same as PyTorch's.
"""

from __future__ import annotations

import math
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


def check_update(update: Mapping[str, torch.Tensor], model: Mapping[str, tuple[int, ...] | torch.Tensor], where: str,
                 *, finite: bool = True) -> None:
    """Reject an update whose names or shapes differ from the model's (its shapes, or its tensors), or (with
    `finite`) that holds NaN/Inf."""
    shapes = {n: tuple(s.shape) if isinstance(s, torch.Tensor) else tuple(s) for n, s in model.items()}
    missing = sorted(set(shapes) - set(update))
    extra = sorted(set(update) - set(shapes))
    if missing or extra:
        raise UpdateRejected(f"{where}: tensor names differ from the model (missing {missing[:3]}, extra {extra[:3]})",
                             code="shape")
    for name, t in update.items():
        if tuple(t.shape) != tuple(shapes[name]):
            raise UpdateRejected(f"{where}: {name} has shape {tuple(t.shape)}, the model has {tuple(shapes[name])}",
                                 code="shape")
        if finite and not torch.isfinite(t).all():
            raise UpdateRejected(f"{where}: {name} contains NaN or Inf", code="nonfinite")


class Accumulator:
    """The sample-weighted mean of a round's updates, folded in one at a time: Σ n_i·g_i in fp32.

    Memory is one model's worth of fp32 whatever the number of shards; the caller drops each update
    once added. Folding in shard order makes the sum independent of the order results arrived in.
    Finiteness is checked once, on the sum (``nonfinite``): a NaN or Inf in any update reaches it.
    """

    def __init__(self, shapes: Mapping[str, tuple[int, ...]]) -> None:
        # Not zeroed: the first update of each tensor is written (n·g), the others added. Zeroing first would
        # cost a pass over fresh memory for nothing.
        self.sum: Tensors = {n: torch.empty(s, dtype=torch.float32) for n, s in shapes.items()}
        self._written: dict[str, int] = {n: 0 for n in shapes}  # elements written so far, per tensor
        self.samples = 0
        self.loss_sum = 0.0
        self.folded: list[Update] = []  # identities and counts only: tensors are dropped (see add)

    def add(self, u: Update) -> None:
        for name, t in u.tensors.items():
            self.fold(name, 0, t.reshape(-1), u.samples)
        self.count(u)

    def fold(self, name: str, first: int, piece: torch.Tensor, samples: int) -> None:
        """Add samples·piece into elements [first, first + len) of tensor `name` (flattened)."""
        target = self.sum[name].view(-1)[first : first + piece.numel()]
        if self._written[name] < self.sum[name].numel():  # the first update of this tensor: write, not add
            torch.mul(piece, float(samples), out=target)
            self._written[name] += piece.numel()
        else:
            target.add_(piece, alpha=float(samples))

    def count(self, u: Update) -> None:
        """Record an update whose tensors the caller has already added into ``sum`` (streamed in pieces)."""
        self.samples += u.samples
        self.loss_sum += u.loss * u.samples
        self.folded.append(Update(u.identity, u.shard, {}, u.samples, u.loss))

    def nonfinite(self) -> list[str]:
        """Tensors holding a NaN or Inf: their float64 sum is not finite (one pass, no mask allocated; a
        float64 sum of finite fp32 values cannot overflow)."""
        return [n for n, t in self.sum.items() if not math.isfinite(float(t.sum(dtype=torch.float64)))]

    def mean(self) -> tuple[Tensors, int, float]:
        """(mean, total samples, weighted mean loss); the sum is divided in place (no second copy)."""
        if self.samples <= 0:
            raise UpdateRejected("no samples in this round's updates")
        if any(self._written[n] < t.numel() for n, t in self.sum.items()):
            raise UpdateRejected("an update did not cover every element of the model")
        for t in self.sum.values():
            t.div_(self.samples)
        return self.sum, self.samples, self.loss_sum / self.samples


def weighted_mean(updates: Sequence[Update]) -> tuple[Tensors, int, float]:
    """Sample-weighted mean of the updates; returns (mean, total samples, weighted mean loss)."""
    if not updates:
        raise UpdateRejected("no samples in this round's updates")
    acc = Accumulator({n: tuple(t.shape) for n, t in updates[0].tensors.items()})
    for u in updates:
        acc.add(u)
    return acc.mean()


def sgd_step_(
    params: Tensors,
    grads: Tensors,
    momentum_buffers: Tensors,
    *,
    lr: float,
    momentum: float = 0.0,
    nesterov: bool = False,
    weight_decay: float = 0.0,
) -> None:
    """One step of SGD in place, exactly as torch.optim.SGD computes it (same operations, same order).

    Updates `params` and `momentum_buffers` (a buffer is created on the first step) and uses `grads`
    as scratch space: no temporary the size of the model is allocated.
    """
    for name, p in params.items():
        g = grads[name]
        if weight_decay:
            g.add_(p, alpha=weight_decay)
        if momentum:
            buf = momentum_buffers.get(name)
            if buf is None:
                buf = momentum_buffers[name] = g.clone()
            else:
                buf.mul_(momentum).add_(g)
            g = g.add_(buf, alpha=momentum) if nesterov else buf
        p.add_(g, alpha=-lr)


def sgd_step(params: Tensors, grads: Tensors, momentum_buffers: Tensors, **hparams: float | bool
             ) -> tuple[Tensors, Tensors]:
    """``sgd_step_`` (same keyword arguments) on copies: returns (new params, new buffers) and changes none
    of its arguments."""
    new_params = {n: p.clone() for n, p in params.items()}
    new_bufs = {n: b.clone() for n, b in momentum_buffers.items()}
    sgd_step_(new_params, {n: g.clone() for n, g in grads.items()}, new_bufs, **hparams)  # type: ignore[arg-type]
    return new_params, new_bufs


def partition(sizes: Sequence[tuple[str, int]], parts: int) -> list[list[str]]:
    """Split parameters (name, number of elements), in model order, into `parts` contiguous ranges of about
    equal size (ps-lite's key ranges). Never an empty range while there are at least `parts` tensors."""
    parts = max(1, min(parts, len(sizes)))
    total = sum(n for _, n in sizes)
    out: list[list[str]] = [[] for _ in range(parts)]
    done = 0
    for i, (name, n) in enumerate(sizes):
        k = min(parts - 1, done * parts // max(1, total))
        k = max(k, parts - (len(sizes) - i)) if len(sizes) - i <= parts else k  # leave a tensor for each range
        k = max(k, max((j for j in range(parts) if out[j]), default=0))  # contiguous: never go back
        out[k].append(name)
        done += n
    return out


def staleness_momentum(momentum: float, staleness: Sequence[int], fraction: float = 1.0) -> float:
    """The explicit momentum for a step on updates this stale (versions behind): asynchrony acts as momentum
    1 − 1/(1+s̄) of its own (Mitliagkas et al. 2016, "Asynchrony begets momentum"); `fraction` of it is taken
    off, never below 0. Fresh updates (s̄ = 0) keep the momentum whole."""
    if not staleness:
        return momentum
    mean = sum(staleness) / len(staleness)
    return max(0.0, momentum - fraction * mean / (1 + mean))


def staleness_lr(lr: float, staleness: int, rule: str) -> float:
    """Learning rate for an update computed `staleness` versions ago (Zhang et al. 2016: η/(1+s))."""
    if staleness < 0:
        raise UpdateRejected(f"update from a future version (staleness {staleness})", code="stale")
    return lr / (1 + staleness) if rule == "inverse" else lr


def lr_factor(schedule: str, t: int, total: int, warmup: int = 0) -> float:
    """The learning rate's multiplier for step `t` (0-based) of a job of `total` steps (its versions; the inner
    steps' rounds with local steps). A linear warm-up over the first `warmup` steps, (t+1)/(warmup+1), then
    "constant" (1) or "cosine": ½(1 + cos(π·(t − warmup)/(total − warmup))), from 1 down towards 0 at the
    last step — torch's LinearLR(start_factor=1/(warmup+1), total_iters=warmup) followed by
    CosineAnnealingLR(T_max=total − warmup, eta_min=0), in closed form (tests/unit/test_lr_schedule.py)."""
    t = max(0, t)
    if t < warmup:
        return (t + 1) / (warmup + 1)
    if schedule == "constant":
        return 1.0
    if schedule != "cosine":
        raise ValueError(f"unknown lr_schedule {schedule!r} (known: constant, cosine)")
    progress = min(1.0, (t - warmup) / max(1, total - warmup))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def predict_weights_(params: Tensors, momentum_buffers: Mapping[str, torch.Tensor], *, lr: float,
                     steps: float) -> None:
    """Weight prediction, in place: the weights `steps` optimizer steps ahead if each repeats the last one,
    w − steps·lr·buf (for SGD with momentum, without Nesterov or weight decay, lr·buf is exactly the step that
    made w). An async update computed on the predicted weights is a gradient near the weights it will be applied
    to, `steps` versions later, rather than behind them (SpecTrain, Chen et al. 2018, arXiv:1809.02839; Kosson et
    al. 2021, "Pipelined Backpropagation at Scale", arXiv:2003.11666). Parameters without a buffer stay."""
    for name, p in params.items():
        buf = momentum_buffers.get(name)
        if buf is not None:
            p.sub_(buf.to(p.device, p.dtype), alpha=steps * lr)


DC_DECAY = 0.95  # the mean square's moving-average factor (Zheng et al. 2017, DC-ASGD-a)


def delay_compensated(grad: Mapping[str, torch.Tensor], now: Mapping[str, torch.Tensor],
                      base: Mapping[str, torch.Tensor], mean_square: Tensors, lam: float) -> Tensors:
    """Delay compensation, DC-ASGD-a (Zheng et al., ICML 2017): a gradient computed on weights `base` but
    applied to `now` is corrected by the first-order term of its Taylor expansion, the Hessian approximated
    by the gradient's outer product (its diagonal, g⊙g), scaled adaptively:

        g̃ = g + λ0 · g⊙g / √(MeanSquare) ⊙ (w_now − w_base),  MeanSquare ← 0.95·MeanSquare + 0.05·g⊙g

    `mean_square` (the job's optimizer state, one tensor per parameter) is updated in place with every
    update, stale or not; returns new tensors (`grad` is left as it is: it may be cached). λ0 = 0 or
    identical weights (staleness 0) leave the gradient unchanged.
    """
    out: Tensors = {}
    for name, g in grad.items():
        g32 = g.float()
        sq = g32 * g32
        ms = mean_square.get(name)
        ms = sq.clone() if ms is None else ms.mul_(DC_DECAY).add_(sq, alpha=1 - DC_DECAY)
        mean_square[name] = ms
        drift = now[name].float() - base[name].float()
        if lam == 0 or not bool(drift.any()):
            out[name] = g
            continue
        out[name] = (g32 + lam * sq / ms.sqrt().add_(1e-12) * drift).to(g.dtype)
    return out


def select_round(
    results: Sequence[Mapping[str, object]], expected_shards: Sequence[int]
) -> tuple[dict[int, Mapping[str, object]], list[int]]:
    """Pick one result per expected shard from a round's results; return (by shard, missing shards).

    Results may name a shard twice (a Celery chord counts completions, not shards) or miss one (the monitor
    sends an aggregation without results).
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
