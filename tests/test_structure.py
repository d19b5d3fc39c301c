"""The package's import graph has no cycle: data flows one way (docs/ARCHITECTURE.md), and a module
never needs another that needs it, not even through an import inside a function."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "adamerge"


def module_files() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package (a package is its ``__init__``)."""
    modules = {}
    for file in PACKAGE.rglob("*.py"):
        parts = file.relative_to(PACKAGE.parent).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = file
    return modules


def imported(tree: ast.AST) -> set[str]:
    """Every dotted name an ``import`` or ``from ... import`` anywhere in the tree may load (a name imported
    from a package may be its submodule)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            assert node.level == 0, f"relative import of {node.module!r}: adamerge imports absolutely"
            names.update([node.module, *(f"{node.module}.{alias.name}" for alias in node.names)])
    return names


def import_graph() -> dict[str, set[str]]:
    modules = module_files()
    return {m: {n for n in imported(ast.parse(f.read_text())) if n in modules and n != m} for m, f in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as a path that ends where it starts, or None (depth-first, three colours)."""
    state: dict[str, str] = {}
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        path.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                return [*path[path.index(target):], target]
            if target not in state and (cycle := visit(target)):
                return cycle
        state[node] = "done"
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_import_graph_is_acyclic():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_a_cycle_is_found():
    """The check itself: a function-local import closing a loop counts."""
    graph = {m: set() for m in ("a", "b", "c")}
    graph["a"].add("b")
    graph["b"].add("c")
    assert find_cycle(graph) is None
    graph["c"].update(n for n in imported(ast.parse("def f():\n    from a import x\n")) if n in graph)
    assert find_cycle(graph) == ["a", "b", "c", "a"]
