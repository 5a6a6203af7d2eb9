"""A worker's image budget from the mapping: a large image costs at most the configured number of
visual tokens on a real ``mole worker``, and ``/info`` shows the budget."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
from PIL import Image
from support import demo_mapping_copy, worker_process

from shared.images import encode_image_b64
from shared.mapping import DEFAULT_WORKER_MAX_PIXELS, parse_mapping

MAX_PIXELS = 4096  # 4 visual tokens of Qwen3-VL (32x32 px each); the demo checkpoint's own budget is 16


def test_a_large_image_costs_at_most_the_workers_budget(demo_assets: Path, tmp_path: Path) -> None:
    mapping = demo_mapping_copy(demo_assets, tmp_path)
    doc = json.loads(mapping.read_text())
    next(w for w in doc["workers"] if w["id"] == "merged-calendar").update(max_pixels=MAX_PIXELS)
    mapping.write_text(json.dumps(doc))
    service = worker_process(mapping, "merged-calendar", tmp_path / "logs")
    try:
        service.wait_ready(120)
        info = httpx.get(f"{service.probe_url}/info").json()
        assert (info["max_pixels"], info["min_pixels"], info["max_image_tokens"]) == (MAX_PIXELS, None, 4)
        big = Image.new("RGB", (1920, 1080), (200, 40, 40))
        body = {"image_b64": encode_image_b64(big), "prompt": "what is this?", "adapter": "calendar"}
        answer = httpx.post(f"{service.probe_url}/infer", json=body, timeout=60).json()
        assert 0 < answer["image_tokens"] <= MAX_PIXELS // (32 * 32), answer
        assert answer["prompt_tokens"] > answer["image_tokens"]
        metrics = httpx.get(f"{service.probe_url}/metrics").text
        assert (
            f'mole_worker_image_tokens_total{{adapter="calendar"}} {float(answer["image_tokens"])}' in metrics
        )
    finally:
        service.stop()


def test_the_default_budget_is_bounded_and_min_cannot_exceed_max(tmp_path: Path) -> None:
    import pytest

    from shared.errors import ConfigError

    doc = {
        "base_model": "base",
        "router": {"adapter": "router", "labels": {"0": "a"}},
        "adapters": {"a": {"label": "0", "lora": "l/a"}},
        "workers": [{"id": "w", "url": "http://127.0.0.1:9001", "mode": "dynamic", "adapters": ["a"]}],
    }
    worker = parse_mapping(doc, base_dir=tmp_path, env={}).workers[0]
    assert worker.max_pixels == DEFAULT_WORKER_MAX_PIXELS == 2048 * 32 * 32 and worker.min_pixels is None
    doc["workers"][0].update(min_pixels=8192, max_pixels=4096)
    with pytest.raises(ConfigError, match="min_pixels"):
        parse_mapping(doc, base_dir=tmp_path, env={})
