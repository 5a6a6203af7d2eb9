"""Smoke test of ``mole-bench``: one tiny scenario end to end on real in-process workers.

Runs the micro-batching scenario with ``--quick`` (a handful of requests) through the console script and
checks that the report and its plot are written. No timing assertions: this machine is shared.
"""

from __future__ import annotations

import re
from pathlib import Path

from benchmarks.run import main


def test_bench_quick_batching_writes_report(demo_assets: Path, tmp_path: Path) -> None:
    out = tmp_path / "docs" / "benchmarks.md"
    argv = ["--assets", str(demo_assets), "--quick", "--only", "batching", "--out", str(out)]

    assert main([*argv, "--work", str(tmp_path / "work")]) == 0

    text = out.read_text()
    assert text.startswith("# mole benchmarks")
    assert "mole-bench --assets" in text and "--only batching" in text  # the exact command
    assert "| logical cores |" in text and "load average" in text  # machine and load
    assert "## 2. Micro-batching" in text
    assert "| concurrency | on req/s | off req/s | on / off |" in text
    rows = re.findall(r"^\| (\d+) \| [\d.]+ \| [\d.]+ \| [\d.]+× \|", text, flags=re.M)
    assert rows == ["1", "4"]  # the quick levels, one row each
    assert "batching ≥ 2.5× throughput" in text  # the target is reported (met or not)
    assert "merged-vs-dynamic" not in text  # only the selected scenario ran
    plot = out.parent / "bench_batching.png"
    assert plot.stat().st_size > 1000
    assert "](bench_batching.png)" in text


def test_bench_quick_label_growth_reports_the_shared_prefix_saving(demo_assets: Path, tmp_path: Path) -> None:
    out = tmp_path / "benchmarks.md"
    argv = ["--assets", str(demo_assets), "--quick", "--only", "label-growth", "--out", str(out)]

    assert main([*argv, "--work", str(tmp_path / "work")]) == 0

    text = out.read_text()
    assert "## 8. Routing cost as router labels grow" in text
    rows = re.findall(r"^\| (\d+) \| \d+–\d+ \| [\d.]+ \| [\d.]+ \| [\d.]+× \|", text, flags=re.M)
    assert rows == ["4", "16", "64"]
