"""Abuse inputs and schema fuzzing against a real worker process.

Pass criteria: every abusive request gets a 4xx whose message names the field or the limit, the
worker's memory stays within a stated bound, no generated input gets a 5xx or hangs, and the
worker still serves a normal request afterwards.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from attacks import RSS_BOUND_MB, abuse_cases, fuzz_figures, fuzz_openapi, run_abuse
from conftest import LONG
from support import Service, demo_mapping_copy, worker_process

from shared import synthetic
from shared.images import encode_image_b64


@pytest.fixture(scope="module")
def worker(demo_assets: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    tmp = tmp_path_factory.mktemp("abuse")
    svc = worker_process(demo_mapping_copy(demo_assets, tmp), "merged-calendar", tmp)
    svc.wait_ready()
    yield svc
    svc.stop()


def _good(seed: int) -> dict[str, Any]:
    sample = synthetic.make_samples(1, seed=seed)[0]
    return {"image_b64": encode_image_b64(sample.image), "prompt": sample.prompt, "adapter": "calendar"}


def test_abusive_inputs_get_a_4xx_naming_the_limit(worker: Service, figures: dict) -> None:
    assert worker.proc.pid is not None
    results, growth_mb = run_abuse(f"{worker.url}/infer", abuse_cases(_good(1), worker=True), worker.proc.pid)
    assert growth_mb < RSS_BOUND_MB
    assert httpx.post(f"{worker.url}/infer", json=_good(2), timeout=30).status_code == 200
    figures["abuse (worker)"] = {
        **results,
        "inputs tried": len(results),
        "RSS growth, MB (bound)": f"{growth_mb:.1f} ({RSS_BOUND_MB})",
    }


def test_fuzzed_requests_never_get_a_5xx(worker: Service, figures: dict) -> None:
    tried, statuses = fuzz_openapi(
        worker.url,
        300 if LONG else 60,
        # adapter management has its own tests; fuzzing it would unload the model's adapters
        skip=lambda method, path: method == "DELETE" or path == "/adapters",
    )
    assert httpx.get(f"{worker.url}/health/ready").status_code == 200
    figures["fuzzing (worker OpenAPI, schemathesis)"] = fuzz_figures(tried, statuses)
