"""The folder tree is the architecture (docs/architecture.md): every module of ``linearize`` sits in one tier and
imports only from its own tier or the tiers below, lazy (in-function) imports included, and no modules import each
other in a circle. Read from the source with ``ast``; nothing is imported."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import REPO

PACKAGE = REPO / "linearize"
# tier name -> the packages / modules in it, lowest first (docs/architecture.md has one row per folder)
TIERS = [
    ("base", ["linearize.errors", "linearize.settings", "linearize.env"]),
    ("io", ["linearize.io"]),
    ("kernels", ["linearize.kernels"]),
    ("modules", ["linearize.modules"]),
    ("models", ["linearize.models", "linearize._autoregister"]),
    ("services", ["linearize.data", "linearize.run", "linearize.metrics", "linearize.export"]),
    ("stages", ["linearize.convert", "linearize.finetune", "linearize.eval", "linearize.bench", "linearize.recipes"]),
    ("cli", ["linearize.cli"]),
]
ENTRY_POINTS = {"linearize", "linearize.__main__", "linearize.convert.__main__", "linearize.finetune.__main__"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def tier_of(module: str) -> int:
    for i, (_, members) in enumerate(TIERS):
        if any(module == m or module.startswith(m + ".") for m in members):
            return i
    raise AssertionError(f"{module} is in no tier: add its folder to TIERS and a row to docs/architecture.md")


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """The linearize modules ``path`` imports, at module level or inside functions (not under TYPE_CHECKING)."""
    tree = ast.parse(path.read_text())
    skip = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
            for n in ast.walk(node)}
    out = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from pkg import name`: the submodule pkg.name where there is one, else pkg itself (its __init__)
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                     for a in node.names]
        else:
            continue
        for name in names:
            while name and name not in modules:  # a name inside a module: that module
                name = name.rpartition(".")[0]
            if name.startswith("linearize.") and name not in ENTRY_POINTS:
                out.add(name)
    return out


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    return {m: _imports(p, modules) - {m} for m, p in modules.items() if m not in ENTRY_POINTS}


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{a} ({TIERS[tier_of(a)][0]}) imports {b} ({TIERS[tier_of(b)][0]})"
                  for a, targets in graph.items() for b in targets if tier_of(b) > tier_of(a))


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_every_module_has_a_tier():
    for module in import_graph():
        tier_of(module)


def test_no_module_imports_from_a_higher_tier():
    assert upward_imports(import_graph()) == []


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_the_checks_catch_a_planted_upward_import_and_cycle():
    graph = import_graph()
    planted = {**graph, "linearize.models.cache": graph["linearize.models.cache"] | {"linearize.cli.main"}}
    assert upward_imports(planted) == ["linearize.models.cache (models) imports linearize.cli.main (cli)"]
    a, b = "linearize.convert.config", "linearize.convert.selection"
    planted = {**graph, a: graph[a] | {b}, b: graph[b] | {a}}
    assert any({a, b} <= set(c) for c in cycles(planted))
