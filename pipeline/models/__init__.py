"""The model table: built-in names → (factory, task, default arguments); a user model is ``module:factory``.

A factory takes keyword arguments (the model's arguments, recorded in every checkpoint and artifact so
a loader can rebuild the exact architecture) and returns an ``nn.Module``. Every built-in is listed in
``BUILTIN`` below, explicitly: importing a model module registers nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn

from pipeline.imports import ImportRefused, is_import_path, resolve_import
from pipeline.models import char_lm, digits_cnn, gpt


class ModelError(ValueError):
    """An unknown model name or an import path that does not give a model factory."""


@dataclass(frozen=True)
class ModelEntry:
    factory: Callable[..., nn.Module]
    # The task decides the loss and the metric ("classify": cross-entropy + accuracy; "lm": next-token
    # cross-entropy + perplexity).
    task: str
    args: dict[str, Any] = field(default_factory=dict)  # the full default arguments a checkpoint records


def _small_cnn(**kwargs: Any) -> nn.Module:
    return digits_cnn.digits_cnn(**{**digits_cnn.config_args(digits_cnn.SMALL), **kwargs})


BUILTIN: dict[str, ModelEntry] = {
    "digits-cnn": ModelEntry(digits_cnn.digits_cnn, "classify", digits_cnn.config_args(digits_cnn.DigitsCNNConfig())),
    "digits-cnn-small": ModelEntry(_small_cnn, "classify", digits_cnn.config_args(digits_cnn.SMALL)),
    "char-lm": ModelEntry(char_lm.char_lm, "lm", asdict(char_lm.CharLMConfig())),
    # Named sizes 1m/10m/100m/1b (pipeline/models/gpt.py); the checkpoint records the size's name.
    "gpt": ModelEntry(gpt.gpt, "lm", gpt.default_args()),
}


def default_args(name: str) -> dict[str, Any]:
    entry = BUILTIN.get(name)
    return dict(entry.args) if entry is not None else {}


def get_factory(name: str) -> Callable[..., nn.Module]:
    if name in BUILTIN:
        return BUILTIN[name].factory
    if not is_import_path(name):
        raise ModelError(f"unknown model {name!r} (built-in: {', '.join(sorted(BUILTIN))}; or 'module:factory')")
    try:
        return resolve_import(name, "model")
    except ImportRefused as e:
        raise ModelError(str(e)) from None


def model_task(name: str) -> str:
    """User models are classifiers unless the factory says otherwise through a ``task`` attribute."""
    if name in BUILTIN:
        return BUILTIN[name].task
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
