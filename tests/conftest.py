"""Session fixtures: the demo asset set is built once and cached on disk (``MOLE_ASSETS_CACHE``)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def demo_assets() -> Path:
    """The embedded default model set (tiny Qwen3-VL, router + expert LoRAs, merged hot experts)."""
    from mole.demo_assets import build_demo_assets

    root = Path(
        os.environ.get("MOLE_ASSETS_CACHE", Path(__file__).resolve().parent.parent / ".cache/demo_assets")
    )
    build_demo_assets(root, log=lambda _msg: None)
    return root
