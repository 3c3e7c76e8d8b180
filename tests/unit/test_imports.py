"""The package's import graph, read from the source (``ast``), not by importing it.

Nodes are the modules under ``src/pirl`` (a package is its ``__init__.py``). An edge A -> B means A's
module-level code imports B: ``import pirl.x.y`` gives an edge to ``pirl.x.y``; ``from pirl.x import y`` gives
an edge to ``pirl.x.y`` when that is a module, else to the package ``pirl.x`` whose ``__init__`` defines ``y``.
Imports inside functions run only when called, so they are left out of the cycle check (a function-local
import is the usual way to break a cycle); the layering checks below count them too. Names a package imports
on first use through a module ``__getattr__`` (``pirl``, ``pirl.bank``) are invisible here by design: they cost
nothing at import time and form no cycle.

Checked: no cycle among pirl modules; ``pirl.eval.*`` never imports ``pirl.training.*``, and ``pirl.data.*``
never imports the bank (``pirl.bank``, ``pirl.bank.*``, ``pirl.bank_sharded``), directly or through other modules.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from helpers import REPO_ROOT

SRC = REPO_ROOT / "src"


def module_files(src: Path, top: str = "pirl") -> dict[str, Path]:
    """Module name -> file, for every ``.py`` under ``src/top``."""
    found = {}
    for path in sorted((src / top).rglob("*.py")):
        parts = list(path.relative_to(src).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _imports(tree: ast.AST, module_level: bool) -> list[ast.Import | ast.ImportFrom]:
    """Import statements of ``tree``: outside function bodies only when ``module_level``."""
    found = []

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if module_level and isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                continue
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                found.append(child)
            visit(child)

    visit(tree)
    return found


def import_graph(src: Path, top: str = "pirl", module_level: bool = True) -> dict[str, set[str]]:
    """Module -> the pirl modules it imports (see the module docstring)."""
    files = module_files(src, top)
    graph: dict[str, set[str]] = {name: set() for name in files}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in _imports(ast.parse(path.read_text(), str(path)), module_level):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                base = node.module or ""
                if node.level:  # relative: from the package, one level up per extra dot
                    anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in files else base for alias in node.names]
            for target in targets:
                while target and target not in files:  # ``import pirl.x.y`` of a name that is no module
                    target = target.rpartition(".")[0]
                if target and target != name:
                    graph[name].add(target)
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (or a module importing itself), sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def connect(node: str) -> None:  # Tarjan's algorithm
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                connect(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1 or node in graph.get(node, ()):
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return sorted(cycles)


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph.get(todo.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def _violations(graph: dict[str, set[str]], sources: str, forbidden: tuple[str, ...]) -> dict[str, list[str]]:
    def within(name: str, prefix: str) -> bool:
        return name == prefix or name.startswith(prefix + ".")

    bad = {}
    for name in graph:
        if within(name, sources):
            hits = sorted(m for m in reachable(graph, name) if any(within(m, f) for f in forbidden))
            if hits:
                bad[name] = hits
    return bad


# ----------------------------------------------------------------------------- the tools on planted graphs


def test_find_cycles_on_planted_graphs():
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert find_cycles({"a": {"b"}, "b": {"a"}, "c": {"c"}, "d": set()}) == [["a", "b"], ["c"]]
    assert find_cycles({"a": {"b", "c"}, "b": {"c"}, "c": set()}) == []


def test_the_graph_builder_finds_a_planted_cycle_and_layering_breach(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from pkg.sub.b import thing\n")
    (pkg / "a.py").write_text("import os\nfrom pkg.sub import b\n\ndef later():\n    import pkg.c\n")
    (pkg / "sub" / "b.py").write_text("from .. import a\nthing = 1\n")
    (pkg / "c.py").write_text("from pkg.sub import thing\n")
    graph = import_graph(tmp_path, "pkg")
    assert graph == {
        "pkg": set(),
        "pkg.sub": {"pkg.sub.b"},
        "pkg.a": {"pkg.sub.b"},
        "pkg.sub.b": {"pkg.a"},
        "pkg.c": {"pkg.sub"},
    }
    assert find_cycles(graph) == [["pkg.a", "pkg.sub.b"]]
    assert _violations(graph, "pkg.c", ("pkg.a",)) == {"pkg.c": ["pkg.a"]}  # through pkg.sub and pkg.sub.b
    assert "pkg.c" in import_graph(tmp_path, "pkg", module_level=False)["pkg.a"]


# ----------------------------------------------------------------------------- the package itself


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return import_graph(SRC)


def test_the_graph_covers_the_package(graph):
    assert {"pirl", "pirl.training.loop", "pirl.bank.replicated", "pirl.distributed.sync_bn"} <= set(graph)
    assert "pirl.training.step" in graph["pirl.training.loop"]


def test_no_import_cycle_among_pirl_modules(graph):
    assert find_cycles(graph) == []


def test_eval_does_not_import_training():
    everything = import_graph(SRC, module_level=False)  # function-local imports count here
    assert _violations(everything, "pirl.eval", ("pirl.training", "pirl.train")) == {}


def test_data_does_not_import_the_bank():
    everything = import_graph(SRC, module_level=False)
    assert _violations(everything, "pirl.data", ("pirl.bank", "pirl.bank_sharded")) == {}
