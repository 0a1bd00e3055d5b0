"""``digits-cnn`` (and its distillation student ``digits-cnn-small``): a small CNN for 8×8 digit images."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F


@dataclass(frozen=True)
class DigitsCNNConfig:
    channels: tuple[int, int] = (16, 32)
    hidden: int = 64
    classes: int = 10


SMALL = DigitsCNNConfig(channels=(4, 8), hidden=32)  # about 6× fewer parameters: the distillation student


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


def config_args(cfg: DigitsCNNConfig) -> dict[str, Any]:
    """A config as the JSON-friendly argument dict a checkpoint records (tuples as lists)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(cfg).items()}
