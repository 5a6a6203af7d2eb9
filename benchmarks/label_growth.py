"""Scenario 8: routing cost as router labels grow, and what scoring them on a shared prefix saves.

The router scores every label's full token sequence (:func:`shared.scoring.score_labels`): one
forward over the prompt (image included, its KV cache kept) and, for labels of several tokens, one
forward over all label continuations of that cache. The alternative without a shared prefix runs the
prompt once per label (one batch of prompt + label rows). Both are timed in-process on the demo
router's model for 4 to 64 labels of several tokens each, interleaved on the same screens.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any

from benchmarks.core import Check, Section, Table, ms, percentile, ratio, x
from benchmarks.env import BenchContext, make_inputs

LABEL_COUNTS = (4, 16, 64)  # router labels scored per request


def _labels(n: int) -> list[str]:
    """``n`` distinct multi-token labels (expert names as a real mapping would have them)."""
    return [f"expert-{i}" for i in range(n)]


def _per_label_rows(
    model: Any, processor: Any, image: Any, text: str, labels: Sequence[Sequence[int]]
) -> None:
    """The no-shared-prefix way: one batch of prompt + label rows (the prompt runs once per label)."""
    import torch

    from shared.modeling import encode_batch

    width = max(len(seq) for seq in labels)
    batch = encode_batch(processor, [image] * len(labels), [text] * len(labels), "cpu")
    pad = processor.tokenizer.pad_token_id or 0
    tail = torch.full((len(labels), width), pad, dtype=torch.long)
    for i, seq in enumerate(labels):
        tail[i, : len(seq)] = torch.tensor(seq)
    mask = torch.cat([batch["attention_mask"], torch.ones_like(tail)], dim=1)
    types = torch.cat([batch["mm_token_type_ids"], torch.zeros_like(tail)], dim=1)
    with torch.inference_mode():
        model(
            input_ids=torch.cat([batch["input_ids"], tail], dim=1),
            attention_mask=mask,
            mm_token_type_ids=types,
            pixel_values=batch["pixel_values"],
            image_grid_thw=batch["image_grid_thw"],
        )


async def run(ctx: BenchContext) -> Section:
    from benchmarks.baseline import ROUTER_ADAPTER
    from shared.modeling import render_prompt
    from shared.scoring import label_sequences, score_labels

    section = Section("label-growth", "8. Routing cost as router labels grow")
    original = await ctx.original()
    model, processor, mapping = original.model, original.processor, original.mapping
    text = render_prompt(processor, mapping.router.prompt)
    inputs = make_inputs(ctx.pick(24, 3), seed=808)

    def timed(fn: Any) -> float:
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1000.0

    table = Table(["labels", "tokens per label", "shared prefix p50 ms", "prompt per label p50 ms", "saving"])
    shared_p50: dict[int, float] = {}
    for count in LABEL_COUNTS:
        seqs = label_sequences(processor.tokenizer, _labels(count))
        shared_ms: list[float] = []
        naive_ms: list[float] = []

        def measure(image: Any, shared_first: bool, seqs: list[list[int]] = seqs) -> tuple[float, float]:
            model.set_adapter(ROUTER_ADAPTER)
            runs = {
                "shared": lambda: score_labels(model, processor, [image], [text], seqs),
                "naive": lambda: _per_label_rows(model, processor, image, text, seqs),
            }
            order = ("shared", "naive") if shared_first else ("naive", "shared")
            took = {name: timed(runs[name]) for name in order}
            return took["shared"], took["naive"]

        for i, inp in enumerate(inputs):
            s, n = await asyncio.to_thread(measure, inp.image, i % 2 == 0)
            shared_ms.append(s)
            naive_ms.append(n)
        lengths = sorted({len(seq) for seq in seqs})
        p_shared, p_naive = percentile(shared_ms, 50), percentile(naive_ms, 50)
        shared_p50[count] = p_shared
        table.add(
            count,
            f"{lengths[0]}–{lengths[-1]}",
            ms(p_shared, 2),
            ms(p_naive, 2),
            x(ratio(p_naive, p_shared)),
        )
    table.caption = (
        "Model time of routing one screen (image processing included), both ways interleaved on the same "
        "screens; the demo router's model, labels expert-0 … expert-N."
    )
    section.tables.append(table)
    section.method = (
        "In-process on the demo router's model (base + router LoRA). For each label count, the router's "
        "scoring (one forward over the prompt and image, one over every label continuation of its KV cache) "
        "and the same scoring without a shared prefix (a batch of prompt + label rows: the image and prompt "
        "run once per label) route the same held-out screens, interleaved. Labels are untrained names here: "
        "the cost does not depend on what the router learnt. On the 0.24M-parameter demo model the prompt "
        "is cheap; on an 8B model with ~2,000 image tokens the prompt dominates, so the saving grows with it."
    )
    first, last = LABEL_COUNTS[0], LABEL_COUNTS[-1]
    section.checks.append(
        Check(
            "routing cost grows slowly with the number of labels",
            f"{first} → {last} labels: {ms(shared_p50[first], 2)} → {ms(shared_p50[last], 2)} ms p50 "
            f"({x(ratio(shared_p50[last], shared_p50[first]))})",
            "info",
        )
    )
    return section
