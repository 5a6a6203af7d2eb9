"""A coordinator whose router is served by a vLLM worker (``router.served_by``) that does not answer:
routed requests get a clear 503 ``router_unavailable`` at once, never a hang or a 500; a request
naming its expert does not need the router and is served by an HF worker; the coordinator is not
ready while its router's worker is down. No vLLM needed: nothing listens on that worker's port."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
from pydantic import SecretStr
from support import ThreadServer, demo_mapping_copy, free_port, wait_for, worker_process

from coordinator.app import create_app
from mole import synthetic
from shared.images import encode_image_b64
from shared.settings import Settings

API_KEY = "k"
AUTH = {"Authorization": f"Bearer {API_KEY}"}


def test_a_router_worker_that_is_down_is_a_503_and_explicit_experts_still_serve(
    demo_assets: Path, tmp_path: Path
) -> None:
    path = demo_mapping_copy(demo_assets, tmp_path, dispatch={"probe_interval_s": 0.3, "retries": 0})
    doc = json.loads(path.read_text())
    dynamic = next(w for w in doc["workers"] if w["id"] == "dynamic-0")
    gone = {**dynamic, "id": "vllm-router", "url": f"http://127.0.0.1:{free_port()}", "engine": "vllm"}
    doc["workers"] = [dynamic, gone]
    doc["router"]["served_by"] = "vllm-router"
    path.write_text(json.dumps(doc))
    worker = worker_process(path, "dynamic-0", tmp_path, env={"MOLE_WORKER_TOKEN": "t"})
    server = ThreadServer(
        create_app(Settings(api_keys=[API_KEY], worker_token=SecretStr("t")), path), free_port()
    )
    sample = synthetic.make_samples(1, seed=3)[0]
    body = {"image_b64": encode_image_b64(sample.image), "prompt": sample.prompt}
    try:
        worker.wait_ready(timeout_s=120)
        server.wait_started()
        with httpx.Client(base_url=server.url, headers=AUTH, timeout=30.0) as client:
            routed = client.post("/classify", json=body)
            wait_for(
                lambda: client.get("/workers").json()["workers"][0]["state"] == "up",
                "the HF worker probed up",
            )
            explicit = client.post("/classify", json={**body, "expert": sample.kind})
            ready = client.get("/health/ready")
    finally:
        server.stop()
        worker.stop()
    assert routed.status_code == 503, routed.text
    error = routed.json()["error"]
    assert error["code"] == "router_unavailable" and error["worker_id"] == "vllm-router"
    assert "name an expert" in error["message"] and "ConnectError" in error["message"]
    assert explicit.status_code == 200 and explicit.json()["worker_id"] == "dynamic-0", explicit.text
    assert ready.status_code == 503  # its router's worker is down
