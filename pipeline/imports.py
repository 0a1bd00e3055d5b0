"""User code: resolving ``module:attribute`` import paths, behind an allowlist of module prefixes.

The only place a user model factory or data set loader is imported. Nothing is imported unless the path
is well formed and its module falls under a prefix of ``AAS_ALLOWED_IMPORTS`` (comma-separated, ``*`` for
any module). Unset, no user code is imported at all: built-in models and data sets only (SECURITY.md).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from typing import Any

ALLOW_ANY = "*"


class ImportRefused(ValueError):
    """An import path that is malformed, outside the allowlist, or does not name a callable.

    ``code`` is the reason: ``malformed`` | ``not_allowed`` | ``import_failed`` | ``not_callable``.
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def is_import_path(name: str) -> bool:
    """A name that is meant as ``module:attribute`` (built-in names never contain ':')."""
    return ":" in name


def parse_allowlist(text: str | None) -> tuple[str, ...]:
    """``"a.b, c"`` → ``("a.b", "c")``; empty or None → ``()`` (no user imports)."""
    return tuple(p.strip() for p in (text or "").split(",") if p.strip())


def configured_allowlist() -> tuple[str, ...]:
    from pipeline.settings import get_settings  # lazy: settings read the environment once per process

    return parse_allowlist(get_settings().allowed_imports)


def split_path(path: str, what: str) -> tuple[str, str]:
    """``"pkg.mod:attr"`` → ``("pkg.mod", "attr")``, checked for shape only (nothing is imported)."""
    mod_name, sep, attr = path.partition(":")
    parts = mod_name.split(".")
    if not sep or not all(p.isidentifier() for p in parts) or not attr.isidentifier() or attr.startswith("_"):
        raise ImportRefused("malformed", f"{what} {path!r} is neither a built-in name nor a 'module:attribute' "
                                         "import path (dotted module, a public attribute name)")
    return mod_name, attr


def is_allowed(module: str, allowlist: Sequence[str]) -> bool:
    """True when `module` is one of the prefixes or inside one (``a.b`` allows ``a.b`` and ``a.b.c``, not ``a.bc``)."""
    return any(p == ALLOW_ANY or module == p or module.startswith(p + ".") for p in allowlist)


def check_import(path: str, what: str, allowlist: Sequence[str] | None = None) -> tuple[str, str]:
    """Refuse `path` unless it is well formed and allowed; import nothing. Returns (module, attribute)."""
    allow = configured_allowlist() if allowlist is None else tuple(allowlist)
    mod_name, attr = split_path(path, what)
    if not is_allowed(mod_name, allow):
        allowed = ", ".join(allow) if allow else "none: built-ins only"
        raise ImportRefused("not_allowed", f"{what} {path!r}: module {mod_name!r} is not in AAS_ALLOWED_IMPORTS "
                                           f"({allowed}); add its package prefix there to allow it")
    return mod_name, attr


def resolve_import(path: str, what: str, allowlist: Sequence[str] | None = None) -> Callable[..., Any]:
    """Import ``module:attr`` after the allowlist check and return the callable; ImportRefused otherwise."""
    mod_name, attr = check_import(path, what, allowlist)
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as e:
        raise ImportRefused("import_failed", f"{what} {path!r}: cannot import module {mod_name!r} ({e})") from None
    obj = getattr(mod, attr, None)
    if obj is None or not callable(obj):
        raise ImportRefused("not_callable", f"{what} {path!r}: module {mod_name!r} has no callable {attr!r}")
    return obj
