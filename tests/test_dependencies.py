"""Every third-party module the package (and its entry points) imports is declared in pyproject.toml.

A machine where a package was installed by hand runs everything, so only this check sees a missing declaration: each
import, found with `ast`, is mapped to the distributions that provide it (`importlib.metadata.
packages_distributions()`), and one of them must be a declared dependency, or an optional extra's where the import
is guarded (inside `try: ... except ImportError`).
"""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCES = [*sorted((ROOT / "kl_autoencoder").rglob("*.py")), *sorted((ROOT / "training").glob("*.py")),
           *sorted((ROOT / "eval").glob("*.py"))]
FIRST_PARTY = {"kl_autoencoder"}
# Optional imports behind a check other than `except ImportError`, each with the check that guards it.
CHECKED_ELSEWHERE = {"torchmetrics": "metrics.FIDMetric imports it only after _torch_fidelity_available() (the eval "
                                     "extra has both) or when a test passes its own feature extractor",
                     "mlflow": "trackers.py imports it only for train.report_to=mlflow, which the config check refuses "
                               "(naming the package) when it is not installed",
                     "trackio": "trackers.py imports it only for train.report_to=trackio (the same check)"}


def _name(requirement: str) -> str:
    """A requirement's distribution name, normalised as PEP 503 does."""
    return re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9_.-]+", requirement).group(0)).lower()


def _declared() -> tuple[set[str], set[str]]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    required = {_name(r) for r in project["dependencies"]}
    optional = {_name(r) for extra in project.get("optional-dependencies", {}).values() for r in extra}
    return required, optional


def _guarded(node: ast.Try) -> bool:
    caught = []
    for handler in node.handlers:
        kinds = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
        caught += [k.id for k in kinds if isinstance(k, ast.Name)]
    return bool({"ImportError", "ModuleNotFoundError", "Exception"} & set(caught))


def imports(path: Path) -> list[tuple[str, bool, int]]:
    """(top-level module, guarded, line) of every absolute import in `path`."""
    found = []

    def visit(node: ast.AST, guarded: bool) -> None:
        if isinstance(node, ast.Import):
            found.extend((alias.name.split(".")[0], guarded, node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.module.split(".")[0], guarded, node.lineno))
        inner = guarded or (isinstance(node, ast.Try) and _guarded(node))
        for child in ast.iter_child_nodes(node):
            # only the try body is guarded, not its handlers
            visit(child, inner and not (isinstance(node, ast.Try) and child in node.handlers) or guarded)

    visit(ast.parse(path.read_text(encoding="utf-8")), False)
    return found


def test_every_third_party_import_is_declared():
    required, optional = _declared()
    providers = importlib.metadata.packages_distributions()
    missing = []
    for path in SOURCES:
        for module, guarded, line in imports(path):
            if module in sys.stdlib_module_names or module in FIRST_PARTY or module == "__future__":
                continue
            # a guarded optional module need not be installed: then its import name stands for its distribution
            names = {_name(d) for d in providers.get(module, [])} or {_name(module)}
            allowed = required | (optional if guarded or module in CHECKED_ELSEWHERE else set())
            if not names & allowed:
                missing.append(f"{path.relative_to(ROOT)}:{line} imports {module} "
                               f"(from {', '.join(sorted(names)) or 'no installed distribution'})")
    assert not missing, "undeclared in pyproject.toml:\n" + "\n".join(missing)


def test_the_check_sees_an_undeclared_import(tmp_path):
    source = tmp_path / "x.py"
    source.write_text("import yaml\ntry:\n    import torchmetrics\nexcept ImportError:\n    pass\n"
                      "def f():\n    from webdataset import gopen\n")
    assert imports(source) == [("yaml", False, 1), ("torchmetrics", True, 3), ("webdataset", False, 7)]
