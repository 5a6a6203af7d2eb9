"""The router's image budget: a large screenshot costs the router at most the configured number of
visual tokens, and the mapping's ``router.max_pixels`` reaches the router's forward."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from shared.checkpoints import load_processor
from shared.mapping import parse_mapping
from shared.modeling import encode_batch, render_prompt

MERGED_PATCH_PX = 32 * 32  # one visual token of Qwen3-VL: 16 px patches merged 2x2


@pytest.mark.parametrize("max_pixels", [None, 8192, 4096])
def test_a_large_image_costs_at_most_the_budgeted_visual_tokens(
    demo_assets: Path, max_pixels: int | None
) -> None:
    processor = load_processor(demo_assets / "base")
    text = render_prompt(processor, "which screen?")
    batch = encode_batch(processor, [Image.new("RGB", (1920, 1080))], [text], "cpu", max_pixels=max_pixels)
    t, h, w = batch["image_grid_thw"][0].tolist()
    tokens = t * h * w // 4
    checkpoint_budget = processor.image_processor.size["longest_edge"]
    assert tokens <= (max_pixels or checkpoint_budget) // MERGED_PATCH_PX
    if max_pixels is not None:
        assert tokens < checkpoint_budget // MERGED_PATCH_PX  # really smaller than the checkpoint's
    image_pad = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert int((batch["input_ids"] == image_pad).sum()) == tokens  # the prompt carries exactly those


def test_the_router_routes_at_the_mappings_budget(demo_assets: Path) -> None:
    """``router.max_pixels`` from the mapping reaches the router's forward: at 8192 px (8 visual
    tokens instead of 12) the demo router still routes held-out screens right."""
    import asyncio
    import json

    from coordinator.metrics import CoordinatorMetrics
    from coordinator.router import Router
    from mole import synthetic
    from shared.settings import Settings

    doc = json.loads((demo_assets / "expert_machine_mapping.json").read_text())
    doc["router"]["max_pixels"] = 8192
    mapping = parse_mapping(doc, base_dir=demo_assets, env={})
    router = Router(
        mapping.base_model, mapping.router.adapter, Settings(torch_threads=1), CoordinatorMetrics()
    )
    router.load()
    try:
        config = router.config_for(mapping.router)
        assert config.max_pixels == 8192
        samples = synthetic.make_samples(32, seed=9090)

        async def route_all() -> list[str]:
            scores = await asyncio.gather(*(router.score(s.image, config) for s in samples))
            return [mapping.router.labels[sc.ranked()[0][0]] for sc in scores]

        routed = asyncio.run(route_all())
    finally:
        router.stop(0)
    right = sum(a == s.kind for a, s in zip(routed, samples, strict=True))
    assert right / len(samples) >= 0.95, routed
