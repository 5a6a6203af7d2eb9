"""The one table printer (``shared.table.format_table``)."""

from __future__ import annotations

import pytest

from shared.table import format_table


def test_plain_pads_every_column_but_the_last() -> None:
    text = format_table(("NAME", "URL"), [("a", "http://x"), ("longer", "http://y/a/long/path")])
    assert text.splitlines() == ["NAME    URL", "a       http://x", "longer  http://y/a/long/path"]


def test_plain_strips_trailing_spaces_and_can_rule_the_header() -> None:
    text = format_table(("", "kind", "note"), [("ok", "calendar", ""), ("FAIL", 3, "late")], rule=True)
    assert text.splitlines() == [
        "      kind      note",
        "----  --------  ----",
        "ok    calendar",
        "FAIL  3         late",
    ]


def test_markdown_is_a_github_table() -> None:
    text = format_table(["a", "b"], [["1", "2"], ["x", ""]], style="markdown")
    assert text == "| a | b |\n| --- | --- |\n| 1 | 2 |\n| x |  |"


def test_a_row_with_the_wrong_number_of_cells_is_refused() -> None:
    with pytest.raises(ValueError):
        format_table(("a", "b", "c"), [("1", "2", "3", "4")])
