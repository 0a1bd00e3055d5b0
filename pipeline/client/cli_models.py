"""``aas models ...``: list, show, promote, roll back and delete registered model versions.

``register_cli(subparsers)`` adds the ``models`` command to the main parser; each subcommand calls
``run(args)``. Output is a readable table, or JSON with ``--json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from pipeline.client.output import EXIT_UNAVAILABLE, EXIT_USAGE, fail, iso_time, print_json
from storage.registry import Registry, RegistryError, VersionRecord


def register_cli(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``models`` and its subcommands to an argparse subparsers object."""
    p = subparsers.add_parser("models", help="inspect and manage the model registry")
    sub = p.add_subparsers(dest="models_command", metavar="{list,show,promote,rollback,delete}", required=True)

    def add(name: str, help_: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help_)
        sp.add_argument("--json", action="store_true", help="print JSON instead of a table")
        sp.set_defaults(func=run)
        return sp

    add("list", "registered models with their latest version and aliases")
    sp = add("show", "a model's versions and aliases, or one version in full")
    sp.add_argument("name", help="registered model name")
    sp.add_argument("--version", help="a version number, an alias, or 'latest'")
    sp.add_argument("--limit", type=int, default=20, metavar="N",
                    help="newest N versions (default 20; 0 lists all)")
    sp = add("promote", "point an alias at a version")
    sp.add_argument("name", help="registered model name")
    sp.add_argument("version", type=int, help="version number")
    sp.add_argument("--alias", default="production", help="alias to move (default production)")
    sp = add("rollback", "move an alias back to the version it pointed to before")
    sp.add_argument("name", help="registered model name")
    sp.add_argument("--alias", default="production", help="alias to move back (default production)")
    sp = add("delete", "delete a version and its artifact (refused while an alias points at it)")
    sp.add_argument("name", help="registered model name")
    sp.add_argument("version", type=int, help="version number")
    return p


def open_registry() -> Registry:
    """The registry the environment's settings name (Redis URL, object store, signing key)."""
    from storage.services import build_services

    return build_services().registry()


def run(args: argparse.Namespace, registry: Registry | None = None) -> int:
    """Execute one ``models`` subcommand; 0 on success, 2 on a registry refusal, 3 when Redis does not
    answer (``aas: ...`` on stderr, as every command)."""
    import redis

    try:
        reg = registry or open_registry()
        out = _COMMANDS[args.models_command](reg, args)
    except RegistryError as e:
        return fail(str(e), EXIT_USAGE)
    except redis.RedisError as e:
        return fail(f"cannot reach the registry's Redis: {e} (set AAS_REDIS_URL or start Redis)", EXIT_UNAVAILABLE)
    if args.json:
        print_json(out, indent=2)
    else:
        print(_render(args.models_command, out))
    return 0


def _list(reg: Registry, args: argparse.Namespace) -> Any:
    rows = []
    for name in reg.list_models():
        versions = reg.list_versions(name)
        rows.append(
            {
                "name": name,
                "versions": len(versions),
                "latest": versions[-1].version if versions else None,
                "aliases": reg.aliases(name),
            }
        )
    return rows


def _show(reg: Registry, args: argparse.Namespace) -> Any:
    if args.version is not None:
        return reg.resolve(args.name, args.version).to_dict()
    versions = reg.list_versions(args.name)
    shown = versions[-args.limit:] if args.limit > 0 else versions
    return {
        "name": args.name,
        "aliases": reg.aliases(args.name),
        "total_versions": len(versions),
        "versions": [r.to_dict() for r in shown],
    }


def _promote(reg: Registry, args: argparse.Namespace) -> Any:
    rec = reg.set_alias(args.name, args.alias, args.version)
    return {"model": args.name, "alias": args.alias, "version": rec.version}


def _rollback(reg: Registry, args: argparse.Namespace) -> Any:
    rec = reg.rollback(args.name, args.alias)
    return {"model": args.name, "alias": args.alias, "version": rec.version}


def _delete(reg: Registry, args: argparse.Namespace) -> Any:
    reg.delete_version(args.name, args.version)
    return {"model": args.name, "deleted": args.version}


_COMMANDS = {"list": _list, "show": _show, "promote": _promote, "rollback": _rollback, "delete": _delete}


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain left-aligned text table."""
    cells = [[str(h) for h in headers]] + [["-" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _aliases_text(aliases: dict[str, int]) -> str:
    return ", ".join(f"{a}=v{v}" for a, v in aliases.items()) or "-"


def _metric(rec: dict[str, Any], name: str) -> str:
    v = rec.get("metrics", {}).get(name)
    return f"{v:.4g}" if isinstance(v, (int, float)) and not isinstance(v, bool) else "-"


def _render(command: str, out: Any) -> str:
    if command == "list":
        if not out:
            return "no models registered"
        return table(
            ["MODEL", "VERSIONS", "LATEST", "ALIASES"],
            [[m["name"], m["versions"], m["latest"], _aliases_text(m["aliases"])] for m in out],
        )
    if command == "show" and "versions" in out:
        by_version: dict[int, list[str]] = {}
        for a, v in out["aliases"].items():
            by_version.setdefault(v, []).append(a)
        rows = [
            [
                r["version"],
                iso_time(r["created_at"]),
                r["codec"],
                r["size"],
                _metric(r, "accuracy"),
                _metric(r, "loss"),
                r["lineage"].get("job"),
                ", ".join(sorted(by_version.get(r["version"], []))) or "-",
            ]
            for r in out["versions"]
        ]
        head = f"model {out['name']}  aliases: {_aliases_text(out['aliases'])}\n"
        more = out.get("total_versions", len(rows)) - len(rows)
        foot = f"\n({more} older versions not shown; --limit 0 lists all)" if more > 0 else ""
        return head + table(["VERSION", "CREATED", "CODEC", "BYTES", "ACC", "LOSS", "JOB", "ALIASES"], rows) + foot
    if command == "show":
        rec = VersionRecord(**out)
        lines = [
            f"{k}: {json.dumps(v, sort_keys=True) if isinstance(v, dict) else iso_time(v) if k.endswith('_at') else v}"
            for k, v in rec.to_dict().items()
        ]
        return "\n".join(lines)
    if command in ("promote", "rollback"):
        return f"{out['model']}@{out['alias']} -> v{out['version']}"
    return f"deleted {out['model']} v{out['deleted']}"


def main(argv: list[str] | None = None) -> int:
    """Standalone entry (``python -m pipeline.client.cli_models list``) until the main CLI wires ``models`` in."""
    parser = argparse.ArgumentParser(prog="aas")
    register_cli(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["models", *(sys.argv[1:] if argv is None else argv)])
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
