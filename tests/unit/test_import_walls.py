"""The architecture's import walls, checked on the source: what each top-level package may import.

``shared/`` is what the services import at run time, so it imports neither service nor the tooling;
``worker/`` and ``coordinator/`` never import each other or the tooling; ``benchmarks/`` builds on
``mole/`` (the supervisor, the demo assets), never the reverse.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
FORBIDDEN = {
    "shared": {"worker", "coordinator", "mole", "modal_deploy", "benchmarks"},
    "worker": {"coordinator", "mole", "modal_deploy", "benchmarks"},
    "coordinator": {"worker", "mole", "modal_deploy", "benchmarks"},
    "mole": {"benchmarks"},
    "modal_deploy": {"benchmarks"},
}


def _imported_packages(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_respects_its_import_walls(package: str) -> None:
    crossings = {
        str(path.relative_to(REPO)): sorted(_imported_packages(path) & FORBIDDEN[package])
        for path in sorted((REPO / package).rglob("*.py"))
    }
    assert {file: names for file, names in crossings.items() if names} == {}
