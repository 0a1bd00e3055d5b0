"""Registry naming rules: which model and alias names are valid, and the name a job publishes under.

Pure, so a job spec is checked at submit without reaching the registry.
"""

from __future__ import annotations

import re

RESERVED_ALIASES = frozenset({"latest"})
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


class BadName(ValueError):
    """A model or alias name the registry cannot hold."""


def check_name(name: str, what: str = "model") -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise BadName(f"invalid {what} name {name!r}: use 1-128 of [A-Za-z0-9_.-], starting with a letter or digit")
    return name


def check_alias(alias: str) -> str:
    check_name(alias, "alias")
    if alias.isdigit() or alias in RESERVED_ALIASES:
        raise BadName(f"invalid alias {alias!r}: aliases cannot be numbers or one of {sorted(RESERVED_ALIASES)}")
    return alias


def registry_name(model: str, register_as: str | None = None) -> str:
    """The registry name a job publishes under: `register_as`, else the model's name made registry-safe.

    A user model ``pkg.models:make_net`` is registered as ``pkg.models-make_net``.
    """
    name = register_as or model
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in name).strip("-.") or "model"
