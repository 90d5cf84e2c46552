"""The package's shape: no module imports another module's private (underscore) names, and
the import graph has no cycles (function-level imports included: a lazy import that closes a
cycle is still a cycle). Packages' `__init__` re-exports are not edges of the graph, as they
are not in `../shared/tools/structure.py`; everything else is."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"grpo_ar": ROOT / "grpo_ar", "grpo_ar.adapters": ROOT / "adapters"}


def modules() -> dict[str, Path]:
    out = {}
    for name, base in PACKAGES.items():
        for path in base.rglob("*.py"):
            parts = [p for p in path.relative_to(base).with_suffix("").parts if p != "__init__"]
            out[".".join([name, *parts])] = path
    return out


def resolve(mod: str, path: Path, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = mod.split(".")
    if path.name != "__init__.py":
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def import_graph() -> tuple[dict[str, set[str]], list[str]]:
    mods = modules()
    edges: dict[str, set[str]] = {m: set() for m in mods}
    private = []
    for mod, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                target = resolve(mod, path, node)
                if target not in mods or target == mod:
                    continue
                edges[mod].add(target)
                for alias in node.names:
                    # importing a submodule (`from . import image`) is not a private name
                    if f"{target}.{alias.name}" in mods:
                        continue
                    if alias.name.startswith("_") and not alias.name.startswith("__"):
                        private.append(f"{mod} imports {target}.{alias.name}")
            elif isinstance(node, ast.Import):
                edges[mod].update(a.name for a in node.names if a.name in mods)
    inits = {m for m, p in mods.items() if p.name == "__init__.py"}
    graph = {m: ts - inits for m, ts in edges.items() if m not in inits}
    return graph, private


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on.add(root)
        while work:
            v, children = work[-1]
            w = next(children, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(graph.get(w, ())))))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    found.append(sorted(comp))
    return found


def test_no_private_imports_across_modules():
    _, private = import_graph()
    assert not private, "\n".join(private)


def test_no_import_cycles():
    graph, _ = import_graph()
    assert not cycles(graph)


def test_cycle_finder_finds_cycles():
    # the checker itself must be able to fail
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_few_top_level_modules():
    top = [p.name for p in (ROOT / "grpo_ar").glob("*.py") if p.name != "__init__.py"]
    assert len(top) <= 8, top


def test_pyproject_lists_every_subpackage():
    """A subpackage missing from `[tool.setuptools] packages` would be left out of the wheel."""
    listed = set(
        tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    )
    on_disk = {
        ".".join([name, *p.parent.relative_to(base).parts])
        for name, base in PACKAGES.items()
        for p in base.rglob("__init__.py")
    }
    assert listed == on_disk
