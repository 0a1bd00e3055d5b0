"""Worker-side math: a shard's gradient on one mini-batch, or H local steps → pseudo-gradient; evaluation.

Pure functions over a model and tensors; no queue, no store. Loss is cross-entropy over the last
dimension, which covers classifiers (logits (B, C), targets (B,)) and language models (logits
(B, T, V), targets (B, T)).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F


@dataclass(frozen=True)
class ShardResult:
    update: dict[str, torch.Tensor]  # gradient (H=1) or pseudo-gradient w_start − w_end (H>1), fp32
    samples: int  # samples that contributed (the aggregator's weight)
    loss: float  # mean training loss over those samples (before the update, for H=1)
    # H>1 with a stateful inner optimizer (AdamW, SGD with momentum) asked to keep it: its state after the H
    # steps, by "<param>.<exp_avg|exp_avg_sq|step|momentum_buffer>" (_opt_state), for the shard's next round
    inner_state: dict[str, torch.Tensor] | None = None


def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def distill_loss(
    logits: torch.Tensor, targets: torch.Tensor, teacher_logits: torch.Tensor, temperature: float, alpha: float
) -> torch.Tensor:
    """Hinton et al. 2015: α·T²·KL(softmax(t/T) ‖ softmax(s/T)) + (1−α)·CE(s, y)."""
    t = temperature
    soft = F.kl_div(
        F.log_softmax(logits.reshape(-1, logits.shape[-1]) / t, dim=-1),
        F.softmax(teacher_logits.reshape(-1, teacher_logits.shape[-1]) / t, dim=-1),
        reduction="batchmean",
    ) * (t * t)
    return alpha * soft + (1 - alpha) * loss_fn(logits, targets)


def trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


PRECISIONS = ("auto", "fp32", "bf16")


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of a training step: "auto" is bf16 on CUDA and fp32 (no autocast) elsewhere.

    bf16 keeps fp32's exponent range, so no loss scaling is needed (unlike fp16); weights, gradients and
    the optimizer stay fp32, only matmuls and activations run in bf16. "bf16" on the CPU runs too (slowly).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r} (known: {', '.join(PRECISIONS)})")
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor, teacher: nn.Module | None = None,
             temperature: float = 4.0, alpha: float = 0.7, *, micro_batch_size: int | None = None,
             precision: str = "fp32") -> ShardResult:
    """Mean-loss gradient of one mini-batch at the model's current weights.

    With `micro_batch_size`, the batch runs in slices of that many rows, each slice's mean loss scaled by
    its share of the rows, gradients accumulated: the full batch's gradient (to fp32 rounding) with one
    slice's activations in memory. Exact when every row has the same number of targets (a class, or T
    next bytes). The model is left without gradients (``.grad`` None): the result holds them.
    """
    params = trainable(model)
    if x.shape[0] == 0:
        return ShardResult({n: torch.zeros_like(p, device="cpu") for n, p in params.items()}, 0, 0.0)
    loss = _backward(model, x, y, teacher, temperature, alpha, micro_batch_size, precision)
    grads = {n: (p.grad if p.grad is not None else torch.zeros_like(p)).detach().float().cpu()
             for n, p in params.items()}
    model.zero_grad(set_to_none=True)  # a cached model keeps no gradient (a second copy of the weights' size)
    return ShardResult(grads, int(x.shape[0]), loss)


def _backward(model: nn.Module, x: torch.Tensor, y: torch.Tensor, teacher: nn.Module | None, temperature: float,
              alpha: float, micro_batch_size: int | None, precision: str) -> float:
    """Set every parameter's .grad to the batch's mean-loss gradient; return the mean loss."""
    n = int(x.shape[0])
    dtype = autocast_dtype(precision, x.device)
    step = micro_batch_size or n
    model.train()
    model.zero_grad(set_to_none=True)
    loss_sum = 0.0
    for i in range(0, n, step):
        xb, yb = x[i : i + step], y[i : i + step]  # (b, ...): rows i..i+b
        with torch.autocast(x.device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            logits = model(xb)
            if teacher is not None:
                with torch.no_grad():
                    t_logits = teacher(xb)
                loss = distill_loss(logits, yb, t_logits, temperature, alpha)
            else:
                loss = loss_fn(logits, yb)
        share = xb.shape[0] / n  # 1.0 for a whole batch: the same numbers as without slicing
        (loss * share if step < n else loss).backward()
        loss_sum += float(loss.detach()) * share
    return loss_sum


def local_steps(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    *,
    optimizer: str,
    lr: float,
    teacher: nn.Module | None = None,
    temperature: float = 4.0,
    alpha: float = 0.7,
    micro_batch_size: int | None = None,
    precision: str = "fp32",
    state: dict[str, torch.Tensor] | None = None,
    keep_state: bool = False,
    momentum: float = 0.0,
) -> ShardResult:
    """H inner optimizer steps (DiLoCo); returns Δ = w_start − w_end and the mean loss of the steps.

    The model's weights are restored to w_start on return (an error included): workers keep the module
    of a version between tasks, and the next task on that version must start from it.

    ``state``: the inner optimizer's state to start from (AdamW's moments and step count, or SGD's momentum
    buffers with ``momentum`` > 0, as a previous call returned it with ``keep_state``); None starts fresh.
    DiLoCo (Douillard et al. 2023) keeps each worker's inner AdamW state from round to round rather than resetting
    it: a reset restarts Adam's bias correction, whose first steps move every weight by ~lr whatever its
    gradient's size, every H steps; local SGD with momentum keeps each worker's buffer the same way (SlowMo, Wang
    et al. 2020). Which is better depends on the workload (JobSpec.inner_state).
    """
    params = trainable(model)
    start = {n: p.detach().float().cpu().clone() for n, p in params.items()}
    opt: torch.optim.Optimizer
    if optimizer == "adamw":
        opt = torch.optim.AdamW(params.values(), lr=lr, weight_decay=0.0)
    else:  # with momentum, local SGD with momentum (SlowMo, Wang et al. 2020); without, stateless
        opt = torch.optim.SGD(params.values(), lr=lr, momentum=momentum)
    stateful = optimizer == "adamw" or momentum > 0
    if state is not None and stateful:
        _load_opt_state(opt, params, state, optimizer)
    samples, loss_sum = 0, 0.0
    try:
        for x, y in batches:
            if x.shape[0] == 0:
                continue
            loss = _backward(model, x, y, teacher, temperature, alpha, micro_batch_size, precision)
            opt.step()
            samples += int(x.shape[0])
            loss_sum += loss * int(x.shape[0])
        delta = {n: start[n] - p.detach().float().cpu() for n, p in params.items()}
        kept = _opt_state(opt, params, optimizer) if keep_state and stateful else None
    finally:
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(start[n])
                p.grad = None
    return ShardResult(delta, samples, loss_sum / samples if samples else 0.0, kept)


STATE_KEYS = {"adamw": ("exp_avg", "exp_avg_sq", "step"), "sgd": ("momentum_buffer",)}  # per parameter


def _opt_state(opt: torch.optim.Optimizer, params: dict[str, nn.Parameter], optimizer: str
               ) -> dict[str, torch.Tensor]:
    """The inner optimizer's per-parameter state as "<param>.<key>" tensors (a parameter never stepped has none).
    Not copied: the optimizer is dropped on return, and _load_opt_state copies what it starts from."""
    out: dict[str, torch.Tensor] = {}
    for n, p in params.items():
        st = opt.state.get(p)
        if st:
            out |= {f"{n}.{k}": st[k].detach() for k in STATE_KEYS[optimizer]}
    return out


def _load_opt_state(opt: torch.optim.Optimizer, params: dict[str, nn.Parameter], state: dict[str, torch.Tensor],
                    optimizer: str) -> None:
    """Start the inner optimizer from ``state`` (see _opt_state), checked against the model: a name or shape that
    does not fit raises ValueError naming it (a state from another model or a torn one is never half applied)."""
    state_keys = STATE_KEYS[optimizer]
    names = {f"{n}.{k}" for n in params for k in state_keys}
    extra = sorted(set(state) - names)
    if extra:
        raise ValueError(f"inner optimizer state holds tensors the model does not have: {extra[:3]}")
    loaded = {}
    for n, p in params.items():
        got = {k: state.get(f"{n}.{k}") for k in state_keys}
        if all(t is None for t in got.values()):
            continue
        if any(t is None for t in got.values()):
            raise ValueError(f"inner optimizer state of {n!r} is incomplete (needs {', '.join(state_keys)})")
        shapes = {k: tuple(t.shape) for k, t in got.items()}
        if any(shape != tuple(p.shape) for k, shape in shapes.items() if k != "step") or \
                ("step" in got and got["step"].numel() != 1):
            raise ValueError(f"inner optimizer state of {n!r} has shapes {'/'.join(map(str, shapes.values()))}, "
                             f"the parameter's is {tuple(p.shape)}")
        loaded[p] = {k: (t.detach().to(torch.float32).cpu().reshape(()).clone() if k == "step"
                         else t.detach().to(p).clone()) for k, t in got.items()}
    opt.state.update(loaded)


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, task: str, batch: int = 512) -> dict[str, float]:
    """Test loss plus accuracy (classify) or perplexity (lm)."""
    model.eval()
    total, loss_sum, correct = 0, 0.0, 0
    for i in range(0, x.shape[0], batch):
        xb, yb = x[i : i + batch], y[i : i + batch]
        logits = model(xb)
        n = yb.numel()
        loss_sum += float(loss_fn(logits, yb)) * n
        correct += int((logits.argmax(-1) == yb).sum())
        total += n
    loss = loss_sum / max(1, total)
    out = {"loss": loss, "accuracy": correct / max(1, total)}
    if task == "lm":
        out["perplexity"] = math.exp(min(loss, 50.0))
    return out
