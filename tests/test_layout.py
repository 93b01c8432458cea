"""The package layout's import rule: the core (`kowalski/`, its testing helpers included) imports
nothing above it; `api/` and `ingester/` import the core only, never each other or `ops/`."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from kowalski.config import ROOT

# package -> the top-level packages its modules must never import
FORBIDDEN = {
    "kowalski": {"api", "ingester", "ops", "bench"},
    "api": {"ingester", "ops", "bench"},
    "ingester": {"api", "ops", "bench"},
}


def imported_packages(path: Path) -> set[str]:
    """Top-level package of every absolute import in a module (wherever the import statement is)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def modules(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_imports_nothing_above_it(package: str) -> None:
    found = modules(package)
    assert found, f"no modules under {package}/"
    violations = {
        str(path.relative_to(ROOT)): sorted(imported_packages(path) & FORBIDDEN[package])
        for path in found
    }
    assert {path: bad for path, bad in violations.items() if bad} == {}


def test_checker_sees_every_import_form(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text(
        "import api.app\nfrom ingester import pipeline\nfrom . import sibling\n"
        "def late() -> None:\n    from ops.local import run_local\n"
    )
    assert imported_packages(module) == {"api", "ingester", "ops"}
