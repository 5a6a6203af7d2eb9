"""Any number of experts: a router trained on 16 labels of several tokens each (one per screen
kind and accent colour, aliases of the four demo experts) passes ``check-config``, starts and
routes held-out screens, scoring every label's full token sequence."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
from support import REPO, coordinator_process, free_port, wait_for, worker_process

from mole import synthetic
from mole.demo_assets import many_labels
from shared.images import encode_image_b64


def test_more_than_ten_multi_token_labels_pass_check_config_start_and_route(
    many_label_mapping: Path, tmp_path: Path
) -> None:
    doc = json.loads(many_label_mapping.read_text())
    doc["coordinator"]["url"] = f"http://127.0.0.1:{free_port()}"
    doc["workers"][0]["url"] = f"http://127.0.0.1:{free_port()}"
    mapping = tmp_path / "mapping.json"
    mapping.write_text(json.dumps(doc))
    assert len(doc["router"]["labels"]) == len(many_labels()) > 10

    check = subprocess.run(
        [sys.executable, "-m", "mole.cli", "check-config", str(mapping)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert check.returncode == 0, check.stderr
    assert "router: 16 labels, each scored as its full token sequence: 3 to 7 tokens each" in check.stdout

    worker = worker_process(mapping, "dynamic-0", tmp_path)
    coordinator = coordinator_process(mapping, tmp_path)
    try:
        worker.wait_ready(120)
        coordinator.wait_ready(120)
        wait_for(
            lambda: httpx.get(f"{coordinator.url}/health/ready").status_code == 200, "the coordinator ready"
        )
        samples = synthetic.make_samples(16, seed=2024)
        right = 0
        with httpx.Client(base_url=coordinator.url, timeout=60) as client:
            for s in samples:
                body = {"image_b64": encode_image_b64(s.image), "prompt": s.prompt}
                answer = client.post("/classify", json=body).json()
                right += answer["adapter"] == f"{s.kind}-{s.color}"
                assert answer["routed_by"] == "router" and answer["label"] == answer["adapter"]
                assert synthetic.EXPERT_FORMATS[answer["adapter"].split("-")[0]].match(answer["output"])
        assert right >= 14, f"{right}/16 routed to their kind-colour label"
    finally:
        coordinator.stop()
        worker.stop()
