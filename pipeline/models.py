"""Built-in models and the model registry of names → factories (a user model is ``module:factory``).

A factory takes keyword arguments (the model's arguments, recorded in every checkpoint and artifact so
a loader can rebuild the exact architecture) and returns an ``nn.Module``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from pipeline.imports import ImportRefused, resolve_import


class ModelError(ValueError):
    """An unknown model name or an import path that does not give a model factory."""


@dataclass(frozen=True)
class DigitsCNNConfig:
    channels: tuple[int, int] = (16, 32)
    hidden: int = 64
    classes: int = 10


class DigitsCNN(nn.Module):
    """Two 3×3 convolutions, 2×2 pooling and two linear layers, sized for 8×8 digit images."""

    def __init__(self, cfg: DigitsCNNConfig) -> None:
        super().__init__()
        c1, c2 = cfg.channels
        self.conv1 = nn.Conv2d(1, c1, 3, padding=1)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1)
        self.fc1 = nn.Linear(c2 * 4 * 4, cfg.hidden)
        self.fc2 = nn.Linear(cfg.hidden, cfg.classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, 1, 8, 8) → logits (B, classes)
        x = F.relu(self.conv1(x))  # (B, c1, 8, 8)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)  # (B, c2, 4, 4)
        x = F.relu(self.fc1(x.flatten(1)))  # (B, hidden)
        return self.fc2(x)


def digits_cnn(**kwargs: Any) -> nn.Module:
    cfg = DigitsCNNConfig(**{k: tuple(v) if k == "channels" else v for k, v in kwargs.items()})
    return DigitsCNN(cfg)


def digits_cnn_small(**kwargs: Any) -> nn.Module:
    """A smaller student for distillation (about 6× fewer parameters than ``digits-cnn``)."""
    defaults: dict[str, Any] = {"channels": (4, 8), "hidden": 32}
    defaults.update(kwargs)
    return digits_cnn(**defaults)


def default_args(name: str) -> dict[str, Any]:
    if name == "digits-cnn":
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(DigitsCNNConfig()).items()}
    if name == "digits-cnn-small":
        return {"channels": [4, 8], "hidden": 32, "classes": 10}
    if name == "char-lm":
        from pipeline.charlm import default_args as charlm_args

        return dict(charlm_args())
    return {}


BUILTIN: dict[str, Callable[..., nn.Module]] = {
    "digits-cnn": digits_cnn,
    "digits-cnn-small": digits_cnn_small,
}

# The task a model solves decides its loss and its metric ("classify": cross-entropy + accuracy;
# "lm": next-token cross-entropy + perplexity). User models are classifiers unless they say otherwise
# through a ``task`` attribute on the factory.
TASKS: dict[str, str] = {"digits-cnn": "classify", "digits-cnn-small": "classify"}


def get_factory(name: str) -> Callable[..., nn.Module]:
    if name in BUILTIN:
        return BUILTIN[name]
    if ":" not in name:
        raise ModelError(f"unknown model {name!r} (built-in: {', '.join(sorted(BUILTIN))}; or 'module:factory')")
    try:
        return resolve_import(name, "model")
    except ImportRefused as e:
        raise ModelError(str(e)) from None


def model_task(name: str) -> str:
    if name in TASKS:
        return TASKS[name]
    return str(getattr(get_factory(name), "task", "classify"))


def build_model(name: str, args: dict[str, Any] | None = None) -> nn.Module:
    """Build a model from its registry name (or import path) and arguments."""
    merged = default_args(name)
    merged.update(args or {})
    model = get_factory(name)(**merged)
    if not isinstance(model, nn.Module):
        raise ModelError(f"model factory {name!r} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


from pipeline import charlm as _charlm  # noqa: E402 - charlm imports no pipeline module at load

_charlm.register_model(BUILTIN, TASKS)
