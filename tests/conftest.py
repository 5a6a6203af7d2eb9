"""Session fixtures: the demo asset set is built once and cached on disk (``MOLE_ASSETS_CACHE``);
so is the real-format checkpoint set, next to it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


def _assets_cache() -> Path:
    return Path(
        os.environ.get("MOLE_ASSETS_CACHE", Path(__file__).resolve().parent.parent / ".cache/demo_assets")
    )


@pytest.fixture(scope="session")
def demo_assets() -> Path:
    """The embedded default model set (tiny Qwen3-VL, router + expert LoRAs, merged hot experts)."""
    from mole.demo_assets import build_demo_assets

    root = _assets_cache()
    build_demo_assets(root, log=lambda _msg: None)
    return root


@pytest.fixture(scope="session")
def realformat() -> Path:
    """Tiny checkpoints laid out like the real Qwen3-VL-8B-Instruct folder (see ``realformat.py``)."""
    from realformat import build_realformat

    return build_realformat(_assets_cache().parent / "realformat")


@pytest.fixture(scope="session")
def many_label_mapping(demo_assets: Path) -> Path:
    """A mapping whose router was trained on 16 multi-token labels (aliases of the demo experts),
    cached in its own folder next to the demo assets (see ``build_many_label_router``)."""
    from mole.demo_assets import build_many_label_router

    return build_many_label_router(demo_assets, _assets_cache().parent / "many_labels", log=lambda _m: None)
