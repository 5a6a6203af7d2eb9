"""Per-row decoding state of a batched generate: limits, stop strings, streaming, cancellation.

One :class:`RowDecoder` follows one row of a batch token by token. The batch's generate calls
:class:`RowTracker` (a transformers ``StoppingCriteria``) after every step; it feeds each row's new
token to its decoder and tells generate which rows are done, so a row ends at its own limit, at an
end-of-sequence token, at a stop string or when its client went away, and the batch ends when
every row has. Rows of one batch may stream or not, and may carry different limits and stops, so
a streamed request shares its batch with ordinary ones and its tokens are the ones it would get
alone (greedy).

What a row streams is exactly what its final answer is: the text is stripped, cut before the first
stop string, and a tail that may still become a stop string, trailing whitespace or an incomplete
UTF-8 character is held back until it cannot change any more. The final text is always the
concatenation of the streamed deltas.

The text logic here is pure Python; torch is imported only by :func:`tracker_criteria`.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

logger = logging.getLogger(__name__)

FinishReason = Literal["stop", "length"]
TokenSink = Callable[[str], None]  # receives each new piece of a streamed row's text (compute thread)


@dataclass
class RowDecoder:
    """One row: its token ids so far and what was streamed of its text.

    ``decode`` turns token ids into text (the tokenizer's, special tokens skipped). ``limit`` is the
    row's own cap on generated tokens; ``stop`` its stop strings; ``sink`` receives streamed text;
    ``cancelled`` set by another thread ends the row at the next step.
    """

    decode: Callable[[list[int]], str]
    eos_ids: frozenset[int]
    limit: int
    stop: tuple[str, ...] = ()
    sink: TokenSink | None = None
    cancelled: threading.Event | None = None
    ids: list[int] = field(default_factory=list)
    done: bool = False
    finish_reason: FinishReason = "length"
    _sent: str = ""
    _text: str = ""  # the cut, stripped text once a stop string was found

    @property
    def tokens(self) -> int:
        """Generated tokens counted for this row (the end-of-sequence token included)."""
        return len(self.ids)

    def _needs_text(self) -> bool:
        return bool(self.stop) or self.sink is not None

    def feed(self, token: int) -> bool:
        """Take the row's next generated token; returns ``done``."""
        if self.done:
            return True
        if self.cancelled is not None and self.cancelled.is_set():
            self.done, self.finish_reason = True, "stop"
            return True
        self.ids.append(token)
        if token in self.eos_ids:
            self.done, self.finish_reason = True, "stop"
        elif self._needs_text() and self._stopped_by_string():
            self.done, self.finish_reason = True, "stop"
        elif len(self.ids) >= self.limit:
            self.done, self.finish_reason = True, "length"
        if self.sink is not None and not self.done:
            self._emit(self._safe_prefix())
        return self.done

    def _stopped_by_string(self) -> bool:
        raw = self.decode(self.ids)
        cut = _first_stop(raw, self.stop)
        if cut is None:
            return False
        self._text = raw[:cut].strip()
        return True

    def text(self) -> str:
        """The row's answer: stripped, cut before the first stop string."""
        if self._text:
            return self._text
        raw = self.decode(self.ids)
        cut = _first_stop(raw, self.stop)
        return (raw if cut is None else raw[:cut]).strip()

    def finish(self) -> str:
        """The final text; streams whatever was held back. Call once, after generate."""
        final = self.text()
        if self.sink is not None:
            if final.startswith(self._sent):
                self._emit(final)
            else:  # a tokenizer whose decode of a prefix is not a prefix: nothing sane to append
                logger.warning("streamed text is not a prefix of the final text; the tail is dropped")
        return final

    def _safe_prefix(self) -> str:
        """The part of the text that no later token can change."""
        raw = self.decode(self.ids).lstrip()
        hold = max((_partial_stop(raw, s) for s in self.stop), default=0)
        safe = raw[: len(raw) - hold] if hold else raw
        return safe.rstrip("\ufffd").rstrip()

    def _emit(self, text: str) -> None:
        if len(text) > len(self._sent) and text.startswith(self._sent):
            delta, self._sent = text[len(self._sent) :], text
            assert self.sink is not None
            self.sink(delta)


def _first_stop(text: str, stops: Sequence[str]) -> int | None:
    found = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return min(found) if found else None


def _partial_stop(text: str, stop: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``stop``."""
    for n in range(min(len(stop) - 1, len(text)), 0, -1):
        if text.endswith(stop[:n]):
            return n
    return 0


class RowTracker:
    """Feeds a batch's generated tokens to its rows' decoders (see the module docstring)."""

    def __init__(self, rows: Sequence[RowDecoder], prompt_length: int):
        self.rows = list(rows)
        self.prompt_length = prompt_length  # padded prompt length: new tokens start here
        self._seen = 0

    def step(self, sequences: Any) -> list[bool]:
        """``sequences``: the batch's token ids so far (prompt included); returns done per row."""
        total = sequences.shape[1] - self.prompt_length
        while self._seen < total:
            column = sequences[:, self.prompt_length + self._seen].tolist()
            for row, token in zip(self.rows, column, strict=True):
                row.feed(int(token))
            self._seen += 1
        return [row.done for row in self.rows]


def tracker_criteria(tracker: RowTracker) -> Any:
    """``tracker`` as a transformers ``StoppingCriteria`` (per-row done flags)."""
    import torch
    from transformers import StoppingCriteria

    class _Criteria(StoppingCriteria):
        def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
            done = tracker.step(input_ids)
            return torch.tensor(done, dtype=torch.bool, device=input_ids.device)  # type: ignore[return-value]

    return _Criteria()
