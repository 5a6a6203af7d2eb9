"""Figures recorded by the reliability suite.

Each test adds what it did (requests sent, failed, lost; faults injected; fuzz cases; abuse
inputs) to the session's ``figures``. At the end they are written to ``.cache/reliability.json``,
and, when ``MOLE_RELIABILITY_REPORT=1``, rendered into ``docs/reliability.md``.
``MOLE_RELIABILITY_LONG=1`` runs the longer variants (more requests, more fuzz cases).
"""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
LONG = os.environ.get("MOLE_RELIABILITY_LONG") == "1"


@pytest.fixture(scope="session")
def figures() -> Iterator[dict[str, dict[str, Any]]]:
    recorded: dict[str, dict[str, Any]] = {}
    yield recorded
    out = REPO / ".cache" / "reliability.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(recorded, indent=2, sort_keys=True))
    if os.environ.get("MOLE_RELIABILITY_REPORT") == "1":
        (REPO / "docs").mkdir(exist_ok=True)
        (REPO / "docs" / "reliability.md").write_text(render(recorded))


def render(recorded: dict[str, dict[str, Any]]) -> str:
    lines = [
        "# Reliability figures",
        "",
        "Written by the reliability suite (`tests/reliability/`). Regenerate with:",
        "",
        "```bash",
        "MOLE_RELIABILITY_REPORT=1 .venv/bin/pytest -q tests/reliability"
        + ("  # with MOLE_RELIABILITY_LONG=1" if LONG else ""),
        "```",
        "",
        f"Run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {platform.machine()}, "
        f"{os.cpu_count()} CPU cores, Python {platform.python_version()}; tiny demo Qwen3-VL in float32; "
        f"{'long' if LONG else 'CI'} variant.",
        "",
    ]
    for name in sorted(recorded):
        lines += [f"## {name}", "", "| figure | value |", "| --- | --- |"]
        for key, value in recorded[name].items():
            lines.append(f"| {key} | {value} |")
        lines.append("")
    return "\n".join(lines)
