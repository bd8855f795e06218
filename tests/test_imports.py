"""No import circle between trimig's modules.

The graph is read from the source with ``ast``: every ``import`` and ``from ... import``
statement counts, wherever it stands (inside a function or under ``if TYPE_CHECKING:``
too), so a lazy import cannot hide a circle. An edge goes to the module named:
``from .a import b`` is an edge to ``a.b`` when that is a module, else to ``a`` (``b`` is
a name it defines). A package's ``__init__`` is the package's module; importing a
submodule is not counted as an import of its parent package.
"""

from __future__ import annotations

import ast
from pathlib import Path

import trimig

ROOT = Path(trimig.__file__).resolve().parent


def module_names(root: Path = ROOT) -> dict[str, Path]:
    """Every module under ``root``, by its dotted name."""
    modules = {}
    for path in sorted(root.rglob("*.py")):
        parts = [root.name, *path.relative_to(root).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The trimig modules that module ``name`` (its source at ``path``) imports."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def add(target: str) -> None:
        # The deepest module the dotted name names (``a.b.C`` -> ``a.b``).
        while target and target not in modules:
            target = target.rpartition(".")[0]
        if target and target != name:
            found.add(target)

    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                source = ".".join([*base, *([node.module] if node.module else [])])
            else:
                source = node.module or ""
            for alias in node.names:
                add(f"{source}.{alias.name}")
    return {target for target in found if target.split(".")[0] == ROOT.name}


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    modules = module_names(root)
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(found)


def test_the_graph_sees_lazy_and_relative_imports() -> None:
    graph = import_graph()
    assert "trimig.cli.output" in graph["trimig.cli"]  # relative, in a package's __init__
    assert "trimig.cli.control" in graph["trimig.cli.engines"]  # ``from . import control``
    assert "trimig.savevm.outgoing" in graph["trimig.cli.engines"]  # inside a function
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_circle() -> None:
    found = circles(import_graph())
    assert not found, "import circles: " + "; ".join(" <-> ".join(c) for c in found)
