"""An autoscaled worker gets more than one container's worth of concurrent requests.

A real ``mole worker`` declared as a Modal-style app (``max_containers: 3`` of ``max_concurrency: 2``)
stands in for the autoscaled endpoint: the coordinator must send it up to 6 requests at once, which
the worker's batcher shows as batches of more than 2 rows. Capped at one container's worth (the old
behaviour), it would never see more than 2 at a time.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families
from support import ThreadServer, demo_mapping_copy, free_port, wait_for, worker_process

from coordinator.app import create_app
from mole import synthetic
from shared.images import encode_image_b64
from shared.settings import Settings

PER_CONTAINER = 2  # max_concurrency: what one container of the app accepts
CONTAINERS = 3  # max_containers: the autoscaling ceiling


def _max_batch(metrics_text: str) -> float:
    """The largest batch-size bucket bound any batch fell above (0 when every batch fit the first)."""
    for family in text_string_to_metric_families(metrics_text):
        if family.name == "mole_worker_batch_size":
            buckets = [(float(s.labels["le"]), s.value) for s in family.samples if s.name.endswith("_bucket")]
            total = max(v for _, v in buckets)
            return max((le for le, v in buckets if v < total), default=0.0)
    raise AssertionError("mole_worker_batch_size not exported")


def test_coordinator_sends_an_autoscaled_worker_more_than_one_container(
    demo_assets: Path, tmp_path: Path
) -> None:
    mapping = demo_mapping_copy(demo_assets, tmp_path)
    doc = json.loads(mapping.read_text())
    worker = next(w for w in doc["workers"] if w["id"] == "merged-calendar")
    worker.update(max_concurrency=PER_CONTAINER, max_containers=CONTAINERS)
    mapping.write_text(json.dumps(doc))
    # a long batch wait, so the requests that reach the worker together share one generate call
    service = worker_process(mapping, "merged-calendar", tmp_path / "logs", env={"MOLE_MAX_WAIT_MS": "400"})
    server = ThreadServer(create_app(Settings(torch_threads=1), mapping), free_port())
    try:
        service.wait_ready(120)
        server.wait_started()
        wait_for(
            lambda: any(
                w["id"] == "merged-calendar" and w["state"] == "up"
                for w in httpx.get(f"{server.url}/workers").json()["workers"]
            ),
            "merged-calendar probed up",
        )
        sample = synthetic.make_samples(1, seed=3, kinds=("calendar",))[0]
        body = {"image_b64": encode_image_b64(sample.image), "prompt": sample.prompt, "expert": "calendar"}

        def classify(_: int) -> httpx.Response:
            return httpx.post(f"{server.url}/classify", json=body, timeout=60)

        # twice the capacity in clients, for several rounds: the coordinator keeps the worker full
        # (6 in flight), so its batches after the first hold what queued meanwhile (more than one
        # container's 2); capped at 2 in flight, no batch could ever exceed 2
        clients = 2 * PER_CONTAINER * CONTAINERS
        with ThreadPoolExecutor(clients) as pool:
            answers = list(pool.map(classify, range(3 * clients)))
        assert [a.status_code for a in answers] == [200] * len(answers), answers[0].text
        assert {a.json()["worker_id"] for a in answers} == {"merged-calendar"}
        assert _max_batch(httpx.get(f"{service.probe_url}/metrics").text) > PER_CONTAINER
        row = next(
            w for w in httpx.get(f"{server.url}/workers").json()["workers"] if w["id"] == "merged-calendar"
        )
        assert row["capacity"] == PER_CONTAINER * CONTAINERS
        coordinator_metrics = httpx.get(f"{server.url}/metrics").text
        assert 'mole_coordinator_worker_capacity{worker="merged-calendar"} 6.0' in coordinator_metrics
    finally:
        server.stop()
        service.stop()
