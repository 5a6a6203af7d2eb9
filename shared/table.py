"""The one table printer: aligned plain text for terminals, or a markdown table for reports.

Standard library only, so any module (CLI output, ``shared.mapping``'s routing table, the
benchmark report) can use it without loading anything.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Literal

TableStyle = Literal["plain", "markdown"]


def format_table(
    header: Sequence[object],
    rows: Iterable[Sequence[object]],
    *,
    style: TableStyle = "plain",
    rule: bool = False,
) -> str:
    """``header`` and ``rows`` as one string without a trailing newline; cells go through ``str``.

    ``plain``: every column but the last is padded to its widest cell, columns are separated by two
    spaces and trailing spaces are stripped, so a long last cell (a URL, a path) does not widen the
    others; ``rule`` adds a line of dashes under the header. ``markdown``: a GitHub table
    (``| a | b |`` with a ``| --- |`` rule under the header), cells unpadded; ``rule`` is implied.
    Every row must have as many cells as the header.
    """
    table = [[str(c) for c in header], *([str(c) for c in row] for row in rows)]
    if style == "markdown":
        lines = ["| " + " | ".join(cells) + " |" for cells in table]
        lines.insert(1, "|" + "|".join(" --- " for _ in header) + "|")
        return "\n".join(lines)
    widths = [max(len(cells[i]) for cells in table) for i in range(len(header))]
    lines = [
        "  ".join([*(c.ljust(w) for c, w in zip(cells[:-1], widths[:-1], strict=True)), cells[-1]]).rstrip()
        for cells in table
    ]
    if rule:
        lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
