"""The architecture's map: docs/architecture.md names only files and functions that exist, modules
stay small, and code cites no file outside the repo (the import walls: test_import_walls.py)."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs/architecture.md"


def test_run_time_modules_stay_small() -> None:
    """No module of the services or shared/ grows past ~450 lines: split it by concern."""
    long = {
        str(p.relative_to(REPO)): n
        for package in ("shared", "worker", "coordinator")
        for p in (REPO / package).rglob("*.py")
        if (n := len(p.read_text().splitlines())) > 460
    }
    assert not long


def _rows() -> list[tuple[list[str], list[str]]]:
    """(files, names) of every table row of the doc whose cells name ``.py`` files."""
    rows = []
    for line in DOC.read_text().splitlines():
        if not line.startswith("|"):
            continue
        ticks = re.findall(r"`([^`]+)`", line)
        files = [t for t in ticks if t.endswith(".py")]
        if files:
            rows.append((files, [t for t in ticks if not t.endswith(".py") and "/" not in t]))
    return rows


def test_architecture_doc_names_only_files_and_functions_that_exist() -> None:
    rows = _rows()
    assert len(rows) > 10
    for files, names in rows:
        text = ""
        for f in files:
            assert (REPO / f).is_file(), f"docs/architecture.md names {f}, which does not exist"
            text += (REPO / f).read_text()
        for name in names:
            for part in re.split(r"\s*→\s*", name):
                if not re.fullmatch(r"[A-Za-z_.][\w.]*(\(\))?", part):
                    continue  # a command or a phrase, not a code name
                ident = part.split(".")[-1].strip("()")
                assert re.search(rf"(def|class) {re.escape(ident)}\b|^{re.escape(ident)}\b", text, re.M), (
                    f"docs/architecture.md names {part} in {files}, which is not defined there"
                )


def test_no_code_comment_points_at_a_file_outside_the_repo() -> None:
    """Comments and docstrings cite only files in this repository (``design.md`` is not one)."""
    for package in ("shared", "worker", "coordinator", "mole", "modal_deploy", "benchmarks"):
        for path in (REPO / package).rglob("*.py"):
            assert "design.md" not in path.read_text(), path
