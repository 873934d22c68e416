"""The house as drawn from the code's own imports: no module depends on one that depends on it, and no room is too
big to read.

The import graph is built with `ast` from every `import` in `kl_autoencoder/`, function-level ones included (a
deferred import is still a dependency), so a circle that only works because one side imports late is caught too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "kl_autoencoder"
MAX_BLOCK_LINES = 100  # a class or function longer than this is several concerns, or a loop no longer on one screen


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_names(path: Path, name: str) -> set[str]:
    """Every dotted name an import in `path` can refer to (a module, or a module's attribute)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                base = package[:len(package) - node.level + 1] + ([node.module] if node.module else [])
                module = ".".join(base)
            else:
                module = node.module or ""
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


def import_graph() -> dict[str, set[str]]:
    modules = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        # A package's own __init__ is imported on the way to any of its submodules: not an arrow back up.
        graph[name] = {other for other in imported_names(path, name) & modules.keys()
                       if other != name and not name.startswith(other + ".")}
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for other in sorted(graph[node]):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                other = stack.pop()
                component.append(other)
                if other == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_circles_are_found():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert circles({"a": {"b"}, "b": set()}) == []


def test_relative_imports_resolve_inside_packages(tmp_path):
    path = tmp_path / "m.py"
    path.write_text("from . import images\nfrom .images import decode\nfrom ..config import Config\n")
    names = imported_names(path, "kl_autoencoder.data.m")
    assert {"kl_autoencoder.data.images", "kl_autoencoder.data.images.decode", "kl_autoencoder.config"} <= names


def test_no_import_circles():
    found = circles(import_graph())
    assert not found, "modules that import each other: " + "; ".join(" <-> ".join(c) for c in found)


def python_files() -> list[Path]:
    return sorted([*PACKAGE.rglob("*.py"), *(ROOT / "training").glob("*.py"), *(ROOT / "eval").glob("*.py"),
                   *(ROOT / "benchmarks").glob("*.py")])


@pytest.mark.parametrize("path", python_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_rooms_are_readable(path):
    tree = ast.parse(path.read_text(), filename=str(path))
    assert ast.get_docstring(tree), f"{path.relative_to(ROOT)} has no module docstring"
    long = [f"{node.name} ({node.end_lineno - node.lineno + 1} lines)" for node in ast.walk(tree)
            if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > MAX_BLOCK_LINES]
    assert not long, f"{path.relative_to(ROOT)}: over {MAX_BLOCK_LINES} lines: {', '.join(long)}"
