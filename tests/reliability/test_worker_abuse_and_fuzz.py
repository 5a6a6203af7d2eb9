"""Abuse inputs and schema fuzzing against a real worker process.

Pass criteria: every abusive request gets a 4xx whose message names the field or the limit, the
worker's memory stays within a stated bound, no generated input gets a 5xx or hangs, and the
worker still serves a normal request afterwards.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from conftest import LONG
from PIL import Image
from support import Service, demo_mapping_copy, worker_process

from shared import synthetic
from shared.images import encode_image_b64

RSS_BOUND_MB = 150  # growth of the worker's resident memory over the whole abuse run


@pytest.fixture(scope="module")
def worker(demo_assets: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    tmp = tmp_path_factory.mktemp("abuse")
    svc = worker_process(demo_mapping_copy(demo_assets, tmp), "merged-calendar", tmp)
    svc.wait_ready()
    yield svc
    svc.stop()


def _good(sample: synthetic.Sample) -> dict[str, Any]:
    return {"image_b64": encode_image_b64(sample.image), "prompt": sample.prompt, "adapter": "calendar"}


def _png_b64(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _abuse_cases() -> list[tuple[str, dict[str, Any], int, str]]:
    """(name, httpx.post kwargs, expected status, text the error message must contain)."""
    good = _good(synthetic.make_samples(1, seed=1)[0])
    bomb = _png_b64(Image.new("1", (30_000, 30_000)))  # 900 Mpx that compress to ~110 kB
    nested = '{"image_b64": ' + "[" * 50_000 + "]" * 50_000 + ', "prompt": "x", "adapter": "calendar"}'
    return [
        (
            "decompression-bomb PNG (30000x30000)",
            {"json": {**good, "image_b64": bomb}},
            413,
            "16000000 pixels",
        ),
        (
            "50 MB base64 body",
            {
                "content": b'{"image_b64": "' + b"QUFB" * 12_500_000 + b'"}',
                "headers": {"content-type": "application/json"},
            },
            413,
            "12000000 bytes",
        ),
        (
            "non-image bytes",
            {"json": {**good, "image_b64": base64.b64encode(b"MZ\x90\x00 an executable").decode()}},
            400,
            "image_b64",
        ),
        (
            "http:// image URL",
            {"json": {**good, "image_b64": "http://169.254.169.254/latest"}},
            400,
            "image_b64",
        ),
        ("huge prompt (1 MB)", {"json": {**good, "prompt": "x" * 1_000_000}}, 422, "4096"),
        ("max_new_tokens = 10^9", {"json": {**good, "max_new_tokens": 10**9}}, 422, "max_new_tokens"),
        ("max_new_tokens over the cap", {"json": {**good, "max_new_tokens": 1000}}, 400, "256"),
        (
            "deeply nested JSON (50k levels)",
            {"content": nested, "headers": {"content-type": "application/json"}},
            400,
            "parsing the body",
        ),
        (
            "wrong content type",
            {"content": b'{"prompt": "x"}', "headers": {"content-type": "text/plain"}},
            415,
            "Content-Type",
        ),
        ("unknown field", {"json": {**good, "admin": True}}, 422, "admin"),
    ]


def test_abusive_inputs_get_a_4xx_naming_the_limit(worker: Service, figures: dict) -> None:
    proc = psutil.Process(worker.proc.pid)
    rss_before = proc.memory_info().rss
    peak = rss_before
    results = {}
    for name, kwargs, status, needle in _abuse_cases():
        r = httpx.post(f"{worker.url}/infer", timeout=60, **kwargs)
        peak = max(peak, proc.memory_info().rss)
        assert r.status_code == status, (name, r.status_code, r.text[:300])
        message = r.json()["error"]["message"]
        assert needle in message, (name, message)
        results[name] = f"{r.status_code}: {message[:70]}"
    growth_mb = (peak - rss_before) / 2**20
    assert growth_mb < RSS_BOUND_MB
    ok = httpx.post(f"{worker.url}/infer", json=_good(synthetic.make_samples(1, seed=2)[0]), timeout=30)
    assert ok.status_code == 200
    figures["abuse (worker)"] = {
        **results,
        "inputs tried": len(results),
        "RSS growth, MB (bound)": f"{growth_mb:.1f} ({RSS_BOUND_MB})",
    }


def test_fuzzed_requests_never_get_a_5xx(worker: Service, figures: dict) -> None:
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings

    schema = schemathesis.openapi.from_url(f"{worker.url}/openapi.json")
    examples = 300 if LONG else 60
    tried: dict[str, int] = {}
    statuses: dict[int, int] = {}

    def fuzz(op: Any) -> None:
        name = f"{op.method.upper()} {op.path}"

        @given(case=op.as_strategy())
        @settings(
            max_examples=examples,
            deadline=None,
            phases=[Phase.explicit, Phase.generate],
            suppress_health_check=list(HealthCheck),
            database=None,
        )
        def check(case: Any) -> None:
            response = case.call(base_url=worker.url, timeout=30)
            statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
            tried[name] = tried.get(name, 0) + 1
            assert response.status_code < 500, (name, case.body, response.text[:300])

        check()

    for operation in schema.get_all_operations():
        op = operation.ok()
        if op.method.upper() == "DELETE" or op.path == "/adapters":
            continue  # adapter management has its own tests; fuzzing it would unload the model's adapters
        fuzz(op)
    assert httpx.get(f"{worker.url}/health/ready").status_code == 200
    figures["fuzzing (worker OpenAPI, schemathesis)"] = {
        **{f"cases {k}": v for k, v in sorted(tried.items())},
        "cases total": sum(tried.values()),
        "statuses seen": ", ".join(f"{k}×{v}" for k, v in sorted(statuses.items())),
        "5xx": 0,
    }
