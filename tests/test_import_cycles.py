"""No import cycles inside ruvllm_lab, read statically with ``ast``.

Every ``import``/``from ... import`` counts, at module level and inside functions or classes
(an import moved into a function to dodge a cycle is still a cycle of the design).  Only
imports under ``if TYPE_CHECKING:`` are left out: they never run.  An edge goes to the most
specific module an import names: ``from .pkg import name`` points at ``pkg/name.py`` when that
is a module, else at ``pkg/__init__.py``.  The implicit import of a parent package by its
submodules is not an edge (every package would be a cycle with its own ``__init__``).
"""
from __future__ import annotations

import ast
from pathlib import Path

from .conftest import ROOT

PACKAGE = "ruvllm_lab"


def modules() -> dict[str, Path]:
    """Dotted module name -> file, for every .py under the package (``pkg/__init__.py`` is ``pkg``)."""
    out = {}
    for path in sorted((ROOT / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import node, skipping the bodies of ``if TYPE_CHECKING:``."""
    found = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for name, path in mods.items():
        is_pkg = path.name == "__init__.py"
        package = name if is_pkg else name.rpartition(".")[0]
        for node in _imports(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                if node.level:
                    base = package.split(".")
                    base = base[:len(base) - (node.level - 1)]
                    module = ".".join(base + ([node.module] if node.module else []))
                else:
                    module = node.module or ""
                targets = [f"{module}.{a.name}" if f"{module}.{a.name}" in mods else module for a in node.names]
            for t in targets:
                while t and t not in mods:  # `import ruvllm_lab.x.y` names a module; attributes fall back
                    t = t.rpartition(".")[0]
                if t.startswith(PACKAGE) and t in mods and t != name:
                    graph[name].add(t)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def strongconnect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            strongconnect(v)
    return sorted(out)


def test_the_graph_reader_sees_real_imports():
    graph = import_graph()
    assert "ruvllm_lab.memory.service" in graph["ruvllm_lab.memory"]  # from .service import ...
    assert "ruvllm_lab.config" in graph["ruvllm_lab.memory.service"]  # from ..config import ...
    assert "ruvllm_lab.memory.postgres" in graph["ruvllm_lab.memory.backend"]  # inside a function
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles():
    found = cycles(import_graph())
    assert not found, "import cycles (each line: modules that import each other, directly or not):\n" + "\n".join(
        " <-> ".join(c) for c in found)
