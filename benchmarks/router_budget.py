"""Scenario 7: the router's own image budget (``router.max_pixels``): routing time and accuracy.

The router needs less of the picture than the expert that answers. In-process on the router's model
(base + router LoRA, the same single forward + softmax over the label tokens the coordinator runs),
the same held-out screens are routed at several image budgets, interleaved: the demo screens at the
demo checkpoint's budget and below it, and the same screens as large screenshots at the real
Qwen3-VL-8B-Instruct processor's budget (no downscaling: ~1,900 visual tokens), at the default router
budget and below it.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from PIL.Image import Image

from benchmarks.core import Check, Section, Table, ms, percentile, ratio, x
from benchmarks.env import BenchContext, make_inputs

LARGE = (1600, 1200)  # a large screenshot (1.92 Mpx), same content as the demo screens
REAL_CHECKPOINT_PX = 16_777_216  # Qwen3-VL-8B-Instruct's preprocessor_config.json longest_edge
REAL_MIN_PX = 65_536  # and its shortest_edge
DEFAULT_ROUTER_PX = 262_144  # the mapping's default router.max_pixels
MERGED_PATCH_PX = 32 * 32  # one visual token of Qwen3-VL


async def run(ctx: BenchContext) -> Section:
    import torch

    from benchmarks.baseline import ROUTER_ADAPTER
    from shared.checkpoints import load_processor
    from shared.modeling import encode_batch, label_token_ids, next_token_logits, render_prompt

    section = Section("router-budget", "7. The router's image budget")
    original = await ctx.original()
    model, processor, mapping = original.model, original.processor, original.mapping
    labels = mapping.router.ordered_labels()
    ids = label_token_ids(processor.tokenizer, labels)
    text = render_prompt(processor, mapping.router.prompt)
    checkpoint_px = int(processor.image_processor.size["longest_edge"])
    # The same processor with the real Qwen3-VL-8B-Instruct preprocessor_config.json budget, which a
    # router without its own budget pays on large screenshots (a budget only ever lowers the
    # processor's own, so the demo checkpoint's 16384 px cannot stand in for it).
    real = await asyncio.to_thread(load_processor, mapping.base_model)
    real.image_processor.size = {"shortest_edge": REAL_MIN_PX, "longest_edge": REAL_CHECKPOINT_PX}
    cases: list[tuple[str, tuple[int, int] | None, Any, int, tuple[int, ...]]] = [
        # (screen, size, processor, n, budgets: the first is the reference)
        ("demo screen (128×96)", None, processor, ctx.pick(64, 8), (checkpoint_px, 8192, 4096)),
        (
            f"large screen ({LARGE[0]}×{LARGE[1]})",
            LARGE,
            real,
            ctx.pick(24, 4),
            (REAL_CHECKPOINT_PX, DEFAULT_ROUTER_PX, checkpoint_px),
        ),
    ]
    names = {
        checkpoint_px: f"{checkpoint_px} px (demo checkpoint)",
        REAL_CHECKPOINT_PX: f"{REAL_CHECKPOINT_PX} px (Qwen3-VL-8B's)",
        DEFAULT_ROUTER_PX: f"{DEFAULT_ROUTER_PX} px (router default)",
    }

    def route(proc: Any, image: Image, budget: int) -> tuple[str, float]:
        t0 = time.perf_counter()
        model.set_adapter(ROUTER_ADAPTER)
        logits = next_token_logits(model, proc, [image], [text], max_pixels=budget)
        pick = int(torch.softmax(logits[:, ids], dim=-1).argmax(-1)[0])
        return mapping.router.labels[labels[pick]], (time.perf_counter() - t0) * 1000.0

    def visual_tokens(proc: Any, image: Image, budget: int) -> int:
        grid = encode_batch(proc, [image], [text], "cpu", max_pixels=budget)["image_grid_thw"][0]
        return int(grid.prod()) // 4

    table = Table(["screen", "image budget", "visual tokens", "p50 ms", "p99 ms", "routed right", "speed-up"])
    results: dict[tuple[str, int], tuple[float, int, int]] = {}
    for label, size, proc, n, budgets in cases:
        inputs = make_inputs(n, seed=707, size=size)
        times: dict[int, list[float]] = {b: [] for b in budgets}
        right = dict.fromkeys(budgets, 0)
        for i, inp in enumerate(inputs):
            for budget in budgets if i % 2 == 0 else tuple(reversed(budgets)):
                adapter, elapsed = await asyncio.to_thread(route, proc, inp.image, budget)
                times[budget].append(elapsed)
                right[budget] += adapter == inp.kind
        reference = percentile(times[budgets[0]], 50)
        for budget in budgets:
            p50 = percentile(times[budget], 50)
            results[(label, budget)] = (p50, right[budget], n)
            table.add(
                label,
                names.get(budget, f"{budget} px"),
                visual_tokens(proc, inputs[0].image, budget),
                ms(p50, 2),
                ms(percentile(times[budget], 99), 2),
                f"{right[budget]}/{n}",
                x(ratio(reference, p50)),
            )
    table.caption = (
        "Model time of one routing forward (batch of one, image processing included), budgets interleaved "
        f"on the same screens. Visual tokens: one per {MERGED_PATCH_PX} px after the processor's resize."
    )
    section.tables.append(table)
    section.method = (
        "Held-out screens of all four kinds, routed by the demo router in-process at several image budgets, "
        "interleaved. The demo router was trained on 128×96 screens at the demo checkpoint's budget "
        f"({checkpoint_px} px). The large-screen rows upscale the same screens to {LARGE[0]}×{LARGE[1]} and "
        "route them at the real Qwen3-VL-8B-Instruct processor's budget (what a router without its own "
        "budget pays), at the default router budget, and at the demo checkpoint's budget. On this 0.24M-"
        "parameter model the cost of a visual token is tiny next to an 8B model's, so the speed-up here is "
        "a floor; the token counts are what carries over. A real router's accuracy at a budget has to be "
        "measured on its own task the same way."
    )
    large = cases[1][0]
    p_full, r_full, n_large = results[(large, REAL_CHECKPOINT_PX)]
    p_default, r_default, _ = results[(large, DEFAULT_ROUTER_PX)]
    section.checks.append(
        Check(
            "the router's own budget cuts routing cost on large screenshots",
            f"{LARGE[0]}×{LARGE[1]}: {ms(p_full, 1)} → {ms(p_default, 1)} ms p50 with the default router "
            f"budget ({x(ratio(p_full, p_default))}), routed right {r_full}/{n_large} → {r_default}/{n_large}",
            "info",
        )
    )
    return section
