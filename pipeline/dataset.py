"""The in-memory data set: four tensors and a little metadata (what every loader returns)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


class DataError(ValueError):
    """An unknown data set, or a loader that does not return four tensors."""


@dataclass(frozen=True)
class Dataset:
    x_train: torch.Tensor  # (N, ...) inputs
    y_train: torch.Tensor  # (N,) class ids, or (N, T) next tokens
    x_test: torch.Tensor
    y_test: torch.Tensor
    meta: dict[str, Any]

    @property
    def n_train(self) -> int:
        return int(self.x_train.shape[0])
