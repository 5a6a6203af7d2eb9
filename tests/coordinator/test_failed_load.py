"""A worker whose model cannot be loaded says so: ``failed`` with its error, on the worker's
``/health/ready`` and in the coordinator's ``/workers``, within seconds (not "loading" forever)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import httpx
from support import ThreadServer, demo_mapping_copy, free_port, worker_process

from coordinator.app import create_app
from mole.supervisor import ServiceProcess
from shared.settings import Settings


def _poll(fetch: Any, done: Any, timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = fetch()
        except httpx.HTTPError:
            last = None
        if last is not None and done(last):
            return last
        time.sleep(0.1)
    raise AssertionError(f"not reached within {timeout}s; last seen: {last}")


def test_a_worker_whose_model_folder_is_missing_is_reported_failed(demo_assets: Path, tmp_path: Path) -> None:
    coordinator_mapping = demo_mapping_copy(demo_assets, tmp_path, name="coordinator.json")
    # The worker's machine lacks the model folder the coordinator's copy of the mapping names.
    doc = json.loads(coordinator_mapping.read_text())
    missing = tmp_path / "not-mounted" / "Qwen3-VL"
    next(w for w in doc["workers"] if w["id"] == "dynamic-0")["model"] = str(missing)
    worker_mapping = tmp_path / "worker.json"
    worker_mapping.write_text(json.dumps(doc))

    worker: ServiceProcess = worker_process(worker_mapping, "dynamic-0", tmp_path)
    coordinator = ThreadServer(create_app(Settings(torch_threads=1), coordinator_mapping), free_port())
    try:
        ready = _poll(
            lambda: httpx.get(f"{worker.url}/health/ready", timeout=2),
            lambda r: r.json().get("status") != "loading",
        )
        assert ready.status_code == 503
        body = ready.json()
        assert body["status"] == "failed" and str(missing) in body["error"], body
        assert worker.running()  # alive, so probes and operators can read why

        coordinator.wait_started()
        rows = _poll(
            lambda: {
                w["id"]: w for w in httpx.get(f"{coordinator.url}/workers", timeout=2).json()["workers"]
            },
            lambda rows: rows["dynamic-0"]["state"] == "failed",
            timeout=10.0,
        )
        row = rows["dynamic-0"]
        assert row["available"] is False and str(missing) in row["last_error"]
        # a request for an adapter only that worker holds is a clear 503 naming it, not a hang
        r = httpx.post(
            f"{coordinator.url}/classify",
            json={"image_b64": _tiny_png(), "prompt": "what?", "expert": "login"},
            timeout=30,
        )
        assert r.status_code == 503 and "dynamic-0 (failed)" in r.json()["error"]["message"], r.text
    finally:
        coordinator.stop()
        worker.stop()


def _tiny_png() -> str:
    from PIL import Image

    from shared.images import encode_image_b64

    return encode_image_b64(Image.new("RGB", (32, 32), (200, 30, 30)))
