"""The import graph points one way (DESIGN.md, "Top-level layout"): pure code → storage → workers → top.

Walks every module's AST (imports inside functions included) and fails on an arrow that points up a
layer, on a pure module that imports an I/O library, and on a cycle between files or packages.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("pipeline", "storage", "workers")
LAYER_NAMES = {1: "pure", 2: "storage I/O", 3: "workers", 4: "client/CLI"}
# Libraries that do I/O or pull in a service: never imported by layer 1.
IO_LIBRARIES = ("redis", "celery", "kombu", "redbeat", "minio", "fastapi", "starlette", "uvicorn", "httpx",
                "flower", "prometheus_client", "fakeredis")


def layer(module: str) -> int:
    if module == "pipeline" or module.startswith("pipeline.client"):
        return 4  # the package's face (lazy re-exports of the client) and the client, CLI and demo
    if module.startswith("pipeline"):
        return 1
    if module.startswith("storage"):
        return 2
    return 3


def package(module: str) -> str:
    """The unit of the package graph: top-level packages, with pipeline split as DESIGN.md splits it."""
    if module == "pipeline" or module.startswith("pipeline.client"):
        return "pipeline.client"
    return module.split(".")[0]


def modules() -> dict[str, Path]:
    found = {}
    for pkg in PACKAGES:
        for path in sorted((REPO / pkg).rglob("*.py")):
            parts = list(path.relative_to(REPO).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


MODULES = modules()


def imports_of(module: str) -> Iterator[tuple[str, int]]:
    """(imported name, line) for every import in the module, resolved to a module where it names one."""
    path = MODULES[module]
    is_pkg = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".") if is_pkg else module.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            for a in node.names:
                sub = f"{base}.{a.name}"
                yield (sub if sub in MODULES else base), node.lineno


def internal_edges() -> list[tuple[str, str, int]]:
    edges = []
    for mod in MODULES:
        for name, line in imports_of(mod):
            target = name
            while target and target not in MODULES:
                target = target.rpartition(".")[0]
            if target and target != mod and target.split(".")[0] in PACKAGES:
                edges.append((mod, target, line))
    return edges


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state and (c := visit(m)):
                return c
        state[n] = 2
        stack.pop()
        return None

    for n in sorted(graph):
        if n not in state and (c := visit(n)):
            return c
    return None


def test_the_walk_sees_every_package_and_their_imports() -> None:
    assert {"pipeline.spec", "storage.registry", "workers.tasks", "pipeline.client.cli"} <= set(MODULES)
    assert ("workers.tasks", "workers.app") in {(a, b) for a, b, _ in internal_edges()}


def test_no_import_points_up_a_layer() -> None:
    upward = [f"{MODULES[a].relative_to(REPO)}:{line} imports {b} ({LAYER_NAMES[layer(a)]} → {LAYER_NAMES[layer(b)]})"
              for a, b, line in internal_edges() if layer(b) > layer(a)]
    assert not upward, "imports that point up a layer:\n" + "\n".join(upward)


def test_pure_modules_import_no_io_library() -> None:
    bad = [f"{MODULES[m].relative_to(REPO)}:{line} imports {name}" for m in MODULES if layer(m) == 1
           for name, line in imports_of(m) if name.split(".")[0] in IO_LIBRARIES]
    assert not bad, "pure modules importing I/O libraries:\n" + "\n".join(bad)


def test_no_two_files_import_each_other_in_a_circle() -> None:
    graph: dict[str, set[str]] = {}
    for a, b, _ in internal_edges():
        graph.setdefault(a, set()).add(b)
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle between files: " + " → ".join(cycle or [])


def test_no_two_packages_import_each_other_in_a_circle() -> None:
    graph: dict[str, set[str]] = {}
    for a, b, _ in internal_edges():
        if package(a) != package(b):
            graph.setdefault(package(a), set()).add(package(b))
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle between packages: " + " → ".join(cycle or [])


@pytest.mark.parametrize("graph, cyclic", [({"a": {"b"}, "b": {"c"}}, False), ({"a": {"b"}, "b": {"a"}}, True)])
def test_the_cycle_finder_finds_cycles(graph: dict[str, set[str]], cyclic: bool) -> None:
    assert (find_cycle(graph) is not None) == cyclic
