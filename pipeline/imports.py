"""User import paths (``module:attribute``): the one place that turns one into a Python object."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


class ImportPathError(ValueError):
    """An import path that is malformed, cannot be imported, or does not name a callable."""


def is_import_path(name: str) -> bool:
    return ":" in name


def resolve_import(path: str, what: str) -> Callable[..., Any]:
    """Import ``module:attr`` and return the attribute; ImportPathError with a clear reason otherwise."""
    if not is_import_path(path):
        raise ImportPathError(f"{what} {path!r} is neither a built-in name nor a 'module:attribute' import path")
    mod_name, _, attr = path.partition(":")
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as e:
        raise ImportPathError(f"{what} {path!r}: cannot import module {mod_name!r} ({e})") from None
    obj = getattr(mod, attr, None)
    if obj is None or not callable(obj):
        raise ImportPathError(f"{what} {path!r}: module {mod_name!r} has no callable {attr!r}")
    return obj
