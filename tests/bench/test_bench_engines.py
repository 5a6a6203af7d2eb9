"""The ``engines`` scenario (HF vs vLLM workers): run for real at its ``--quick`` size, and what the
suite does when vLLM's env is missing (``--only engines`` stops; the full run reports it skipped).

Without vLLM's env the real run is skipped, except under ``MOLE_REQUIRE_VLLM=1`` (``make test``),
where its absence fails it. No timing assertions: this machine is shared.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from support import vllm_python

from benchmarks.env import Options
from benchmarks.report import render
from benchmarks.run import SCENARIOS, _runnable, main


def _rows(text: str, first_cell: str) -> list[list[str]]:
    """The cells of every markdown table row whose first cell is ``first_cell``."""
    rows = [line.strip("|").split("|") for line in text.splitlines() if line.startswith(f"| {first_cell} |")]
    return [[cell.strip() for cell in row] for row in rows]


def test_bench_quick_engines_answers_alike_on_hf_and_vllm(
    demo_assets: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MOLE_VLLM_PYTHON", vllm_python())
    out = tmp_path / "benchmarks.md"
    argv = ["--assets", str(demo_assets), "--quick", "--only", "engines", "--out", str(out)]

    assert main([*argv, "--work", str(tmp_path / "work")]) == 0

    text = out.read_text()
    assert "## 9. HF vs vLLM workers" in text and "--only engines" in text
    for path in ("merged worker", "dynamic worker", "whole system"):
        rows = _rows(text, path)  # latency, answers on HF and on vLLM, CPU per request
        assert [len(row) for row in rows] == [6, 6, 6, 4], rows
        by_engine = {row[1]: row for row in rows if row[1] in ("HF", "vLLM")}
        hf, vllm = by_engine["HF"], by_engine["vLLM"]
        n = int(vllm[2])
        assert n > 0 and int(hf[2]) == n
        assert vllm[5] == f"{n}/{n}", vllm  # every vLLM answer equals HF's to the same screen
        assert vllm[4] == hf[4]  # as many exact answers on both engines
        if path == "whole system":
            assert vllm[3] == hf[3] == f"{n}/{n}"  # the same router in front of both: routed right
    throughput = re.findall(r"^\| (\d+) \| [\d.]+ \| [\d.]+ \| [\d.]+× \|", text, flags=re.M)
    assert throughput == ["1", "8"]  # the quick levels, one row each
    assert "| path | HF CPU ms per request | vLLM CPU ms per request | vLLM / HF |" in text
    assert "vLLM answers equal to HF's" in text  # the headline figure
    assert (out.parent / "bench_engines.png").stat().st_size > 1000


def test_bench_only_engines_without_vllm_stops_naming_make_install_vllm(
    demo_assets: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MOLE_VLLM_PYTHON", str(tmp_path / "no-venv/bin/python"))
    out = tmp_path / "benchmarks.md"
    argv = ["--assets", str(demo_assets), "--quick", "--only", "engines", "--out", str(out)]

    with pytest.raises(SystemExit) as stopped:
        main([*argv, "--work", str(tmp_path / "work")])

    assert "make install-vllm" in str(stopped.value) and "engines" in str(stopped.value)
    assert not out.exists()


def test_full_run_without_vllm_reports_engines_skipped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MOLE_VLLM_PYTHON", str(tmp_path / "no-venv/bin/python"))
    options = Options(tmp_path, tmp_path, tmp_path / "b.md", "cpu", "float32", 1, quick=True)

    runnable, skipped = _runnable(list(SCENARIOS), explicit=False, options=options)

    assert runnable == [key for key in SCENARIOS if key != "engines"]
    assert list(skipped) == ["engines"] and "make install-vllm" in skipped["engines"]
    text = render(
        command="mole-bench",
        machine={},
        settings={},
        model={},
        sections=[],
        failures={},
        skipped=skipped,
        seconds=1.0,
        load_start=(0.0, 0.0, 0.0),
        load_end=(0.0, 0.0, 0.0),
    )
    assert "**Scenario `engines` skipped**: vLLM's env is not installed" in text
