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
from support import demo_mapping_copy, worker_process

from mole import synthetic
from mole.supervisor import ServiceProcess
from shared.images import encode_image_b64


@pytest.fixture(scope="module")
def worker(demo_assets: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    tmp = tmp_path_factory.mktemp("abuse")
    svc = worker_process(demo_mapping_copy(demo_assets, tmp), "merged-calendar", tmp)
    svc.wait_ready()
    yield svc
    svc.stop()


def _good(seed: int) -> dict[str, Any]:
    sample = synthetic.make_samples(1, seed=seed)[0]
    return {"image_b64": encode_image_b64(sample.image), "prompt": sample.prompt, "adapter": "calendar"}


def test_abusive_inputs_get_a_4xx_naming_the_limit(worker: ServiceProcess, figures: dict) -> None:
    assert worker.proc.pid is not None
    results, growth_mb = run_abuse(f"{worker.url}/infer", abuse_cases(_good(1), worker=True), worker.proc.pid)
    assert growth_mb < RSS_BOUND_MB
    assert httpx.post(f"{worker.url}/infer", json=_good(2), timeout=30).status_code == 200
    figures["abuse (worker)"] = {
        **results,
        "inputs tried": len(results),
        "RSS growth, MB (bound)": f"{growth_mb:.1f} ({RSS_BOUND_MB})",
    }


def test_fuzzed_requests_never_get_a_5xx(worker: ServiceProcess, figures: dict) -> None:
    tried, statuses = fuzz_openapi(
        worker.url,
        300 if LONG else 60,
        # adapter management has its own tests; fuzzing it would unload the model's adapters
        skip=lambda method, path: method == "DELETE" or path == "/adapters",
    )
    assert httpx.get(f"{worker.url}/health/ready").status_code == 200
    figures["fuzzing (worker OpenAPI, schemathesis)"] = fuzz_figures(tried, statuses)


def test_overload_at_four_times_queue_capacity(
    demo_assets: Path, tmp_path_factory: pytest.TempPathFactory, figures: dict
) -> None:
    import asyncio

    import psutil

    tmp = tmp_path_factory.mktemp("overload")
    queue, batch = 8, 4
    svc = worker_process(
        demo_mapping_copy(demo_assets, tmp),
        "merged-claim",
        tmp,
        env={"MOLE_MAX_QUEUE": str(queue), "MOLE_MAX_BATCH_SIZE": str(batch)},
    )
    try:
        svc.wait_ready()
        assert svc.proc.pid is not None
        proc = psutil.Process(svc.proc.pid)
        rss0 = proc.memory_info().rss
        n = 4 * (queue + batch)
        samples = synthetic.make_samples(n, seed=21, kinds=("claim",))
        bodies = [{**_good(0), "image_b64": encode_image_b64(s.image), "adapter": "claim"} for s in samples]

        async def burst() -> list[httpx.Response]:
            async with httpx.AsyncClient(timeout=60) as client:
                return await asyncio.gather(*(client.post(f"{svc.url}/infer", json=b) for b in bodies))

        responses = asyncio.run(burst())
        codes = [r.status_code for r in responses]
        assert set(codes) <= {200, 429}, codes
        refused = [r for r in responses if r.status_code == 429]
        assert refused and all(int(r.headers["Retry-After"]) >= 1 for r in refused)
        accepted = [r for r in responses if r.status_code == 200]
        assert all(r.json()["output"].startswith("CLAIM status=") for r in accepted)
        growth = (proc.memory_info().rss - rss0) / 2**20
        assert growth < RSS_BOUND_MB
        again = httpx.post(f"{svc.url}/infer", json=bodies[0], timeout=30)
        assert again.status_code == 200, "must recover as soon as load drops"
        figures["overload (worker): 4x queue capacity at once"] = {
            "capacity (queue + batch)": queue + batch,
            "requests sent": n,
            "accepted and completed": len(accepted),
            "refused with 429 + Retry-After": len(refused),
            "lost or failed otherwise": n - len(accepted) - len(refused),
            "RSS growth, MB": f"{growth:.1f}",
            "next request after the burst": again.status_code,
        }
    finally:
        svc.stop()
