"""Adapter auto-discovery on a mounted volume (``loras/<name>/adapter``) for dynamic workers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from support import demo_mapping_copy

from shared.mapping import load_mapping
from worker.holders import DynamicHolder


def test_dynamic_worker_discovers_adapters_on_the_volume(demo_assets: Path, tmp_path: Path) -> None:
    volume = tmp_path / "vol" / "loras"
    for name in ("calendar", "router"):
        shutil.copytree(demo_assets / "loras" / name / "adapter", volume / name / "adapter")
    shutil.copytree(demo_assets / "loras" / "login" / "adapter", volume / "login-v2" / "adapter")
    (volume / "not-an-adapter").mkdir()
    path = demo_mapping_copy(demo_assets, tmp_path)
    doc = json.loads(path.read_text())
    dynamic = next(w for w in doc["workers"] if w["mode"] == "dynamic")
    dynamic["adapters"] = ["calendar"]
    dynamic["discover"] = str(volume)
    doc["router"]["adapter"] = str(volume / "router" / "adapter")
    doc["workers"] = [w for w in doc["workers"] if w["mode"] == "merged"] + [dynamic]
    for name in ("login", "desktop"):  # served only through discovery now
        label = doc["adapters"].pop(name)["label"]
        del doc["router"]["labels"][label]
    path.write_text(json.dumps(doc))
    mapping = load_mapping(path, check_paths=True)
    holder = DynamicHolder(mapping.worker(dynamic["id"]), mapping, device="cpu", dtype="float32")
    paths = holder.adapter_paths()
    # the mapping's own adapter keeps its mapped path; the router's folder is never served
    assert sorted(paths) == ["calendar", "login-v2"]
    assert paths["login-v2"] == volume / "login-v2" / "adapter"
    assert paths["calendar"] == (demo_assets / "loras" / "calendar" / "adapter").resolve()
