"""Per-row decoding: what a streamed row sends is exactly its final answer (stripped, cut at a stop
string), whatever the token boundaries."""

from __future__ import annotations

import threading

import pytest

from shared.decoding import RowDecoder
from shared.mapping import parse_mapping

VOCAB = {1: " ", 2: "cal", 3: "endar", 4: ":", 5: " tag", 6: "=", 7: "gr", 8: "een", 9: " ", 0: "<eos>"}


def _decode(ids: list[int]) -> str:
    return "".join(VOCAB[i] for i in ids if i != 0)


def _run(tokens: list[int], limit: int = 20, stop: tuple[str, ...] = ()) -> tuple[RowDecoder, list[str], str]:
    pieces: list[str] = []
    row = RowDecoder(_decode, frozenset({0}), limit, stop, pieces.append)
    for tok in tokens:
        if row.feed(tok):
            break
    return row, pieces, row.finish()


def test_streamed_pieces_are_the_final_text() -> None:
    row, pieces, final = _run([1, 2, 3, 4, 5, 6, 7, 8, 9, 0])
    assert final == "calendar: tag=green" and "".join(pieces) == final
    assert len(pieces) >= 4 and row.finish_reason == "stop" and row.tokens == 10


@pytest.mark.parametrize(
    ("stop", "text"), [(("=",), "calendar: tag"), ((": t",), "calendar"), (("=gr", "x"), "calendar: tag")]
)
def test_a_stop_string_ends_the_row_and_is_never_streamed(stop: tuple[str, ...], text: str) -> None:
    row, pieces, final = _run([2, 3, 4, 5, 6, 7, 8, 0], stop=stop)
    assert final == text and "".join(pieces) == text
    assert row.finish_reason == "stop" and row.tokens < 8


def test_the_limit_marks_the_answer_cut() -> None:
    row, _pieces, final = _run([2, 3, 4, 5, 6], limit=3)
    assert final == "calendar:" and row.finish_reason == "length" and row.tokens == 3


def test_a_cancelled_row_ends_at_its_next_token() -> None:
    cancelled = threading.Event()
    row = RowDecoder(_decode, frozenset({0}), 20, (), None, cancelled)
    assert not row.feed(2)
    cancelled.set()
    assert row.feed(3) and row.tokens == 1


def _mapping(**top: object) -> dict:
    return {
        "base_model": "/m/base",
        "router": {"adapter": "/m/router", "labels": {"10": "a", "invoice-ocr": "b"}},
        "adapters": {"a": {"label": "10", "lora": "/m/a"}, "b": {"label": "invoice-ocr", "lora": "/m/b"}},
        "workers": [
            {"id": "dynamic-0", "url": "http://127.0.0.1:9", "mode": "dynamic", "adapters": ["a", "b"]}
        ],
        **top,
    }


def test_multi_token_labels_and_the_served_base_model_pass_the_mapping_rules() -> None:
    mapping = parse_mapping(_mapping(serve_base_as="base"), base_dir="/")
    assert mapping.adapter_for("base") == "base" and mapping.adapter_for("10") == "a"
    assert [w.id for w in mapping.workers_for("base")] == ["dynamic-0"]
    with pytest.raises(Exception, match="serve_base_as"):
        parse_mapping(_mapping(serve_base_as="a"), base_dir="/")
