"""The adapter probe's record and verdict: what the coordinator concludes from an engine's
log-probabilities of the recorded answer (the vLLM side runs in tests/coordinator/test_vllm_workers.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from shared.adapter_probe import (
    PROBE_FILE,
    ProbeRecord,
    is_informative,
    probe_image,
    read_record,
    verdict,
    write_record,
)


def _record(adapter: list[float], base: list[float]) -> ProbeRecord:
    n = len(adapter)
    return ProbeRecord(
        prompt="p",
        answer="a" * n,
        prompt_ids=[1, 2, 3],
        answer_ids=list(range(10, 10 + n)),
        starts=["a" * k for k in range(n)],
        adapter_logprobs=adapter,
        base_logprobs=base,
        dtype="float32",
        device="cpu",
    )


def test_an_engine_matching_the_reference_passes_and_one_matching_the_base_is_named() -> None:
    record = _record([-0.1, -0.2, -0.3], [-5.0, -6.0, -4.0])
    assert verdict(record, [-0.1001, -0.2002, -0.2999]) is None
    as_base = verdict(record, [-5.0, -6.01, -4.0])
    assert as_base is not None and as_base.startswith("answers as the base model")
    other = verdict(record, [-2.0, -2.0, -2.0])
    assert other is not None and other.startswith("differs from the adapter's HF reference by 1.8")
    assert is_informative(record) and not is_informative(_record([-1.0], [-1.05]))


def test_the_record_round_trips_and_an_unreadable_one_is_an_error(tmp_path: Path) -> None:
    assert read_record(tmp_path) is None
    record = _record([-0.5], [-3.0])
    write_record(tmp_path, record)
    assert read_record(tmp_path) == record
    (tmp_path / PROBE_FILE).write_text("{not json")
    with pytest.raises(ValueError, match=PROBE_FILE):
        read_record(tmp_path)


def test_the_probe_image_is_the_same_every_time() -> None:
    assert probe_image().tobytes() == probe_image().tobytes()
    assert probe_image().size == (64, 64)
