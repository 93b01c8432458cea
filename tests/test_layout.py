"""The package layout's import rule: the core (`kowalski/`) imports nothing above it; `api/` and
`ingester/` import the core only, never each other or `ops/`; and production code (everything but
`tests/` and `bench/`) never imports the test helpers of `kowalski.testing`."""

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


PRODUCTION = ("kowalski", "api", "ingester", "ops")


def imports_testing(path: Path) -> bool:
    """Whether a module imports `kowalski.testing` (or a module of it), in any form."""
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        if any(
            name == "kowalski.testing" or name.startswith("kowalski.testing.") for name in names
        ):
            return True
    return False


def test_production_code_never_imports_the_test_helpers() -> None:
    found = [path for package in PRODUCTION for path in modules(package)]
    found.append(ROOT / "kowalski.py")
    testing = ROOT / "kowalski" / "testing"
    offenders = [
        str(path.relative_to(ROOT))
        for path in found
        if testing not in path.parents and imports_testing(path)
    ]
    assert offenders == []


def test_testing_checker_sees_every_form(tmp_path: Path) -> None:
    forms = [
        "import kowalski.testing.stall",
        "from kowalski.testing import stall",
        "from kowalski import testing",
        "from kowalski.testing.filters import filter_document",
    ]
    for form in forms:
        module = tmp_path / "m.py"
        module.write_text(f"def late() -> None:\n    {form}\n")
        assert imports_testing(module), form
    module.write_text("from kowalski.services.kafka import broker_ready\n")
    assert not imports_testing(module)
