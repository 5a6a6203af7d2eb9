"""Abuse inputs and a schemathesis fuzz driver, shared by the worker and coordinator suites."""

from __future__ import annotations

import base64
import io
from collections.abc import Callable, Mapping
from typing import Any

import httpx
import psutil
from PIL import Image

RSS_BOUND_MB = 150  # growth of a service's resident memory over a whole abuse run

Case = tuple[str, dict[str, Any], int, str]  # (name, httpx.post kwargs, expected status, text in the message)


def _png_b64(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


def abuse_cases(good: dict[str, Any], *, worker: bool) -> list[Case]:
    """Abusive variants of the valid request body ``good``."""
    bomb = _png_b64(Image.new("1", (30_000, 30_000)))  # 900 Mpx that compress to ~110 kB
    nested = '{"image_b64": ' + "[" * 50_000 + "]" * 50_000 + ', "prompt": "x"}'
    json_ct = {"content-type": "application/json"}
    cases: list[Case] = [
        (
            "decompression-bomb PNG (30000x30000)",
            {"json": {**good, "image_b64": bomb}},
            413,
            "16000000 pixels",
        ),
        (
            "50 MB base64 body",
            {"content": b'{"image_b64": "' + b"QUFB" * 12_500_000 + b'"}', "headers": json_ct},
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
        ("max_new_tokens over the cap", {"json": {**good, "max_new_tokens": 2000}}, 400, "1024"),
        ("deeply nested JSON (50k levels)", {"content": nested, "headers": json_ct}, 400, "parsing the body"),
        (
            "wrong content type",
            {"content": b'{"prompt": "x"}', "headers": {"content-type": "text/plain"}},
            415,
            "Content-Type",
        ),
        ("unknown field", {"json": {**good, "admin": True}}, 422, "admin"),
    ]
    if not worker:
        cases.append(("unknown expert", {"json": {**good, "expert": "nope"}}, 404, "nope"))
    return cases


def run_abuse(
    url: str, cases: list[Case], pid: int, headers: Mapping[str, str] | None = None
) -> tuple[dict[str, str], float]:
    """Send every case; assert its status and message; returns (results, peak RSS growth in MB)."""
    proc = psutil.Process(pid)
    rss_before = proc.memory_info().rss
    peak = rss_before
    results = {}
    for name, kwargs, status, needle in cases:
        kw = dict(kwargs)
        kw["headers"] = {**(headers or {}), **kw.get("headers", {})}
        r = httpx.post(url, timeout=60, **kw)
        peak = max(peak, proc.memory_info().rss)
        assert r.status_code == status, (name, r.status_code, r.text[:300])
        message = r.json()["error"]["message"]
        assert needle in message, (name, message)
        results[name] = f"{r.status_code}: {message[:70]}"
    return results, (peak - rss_before) / 2**20


def fuzz_openapi(
    base_url: str,
    examples: int,
    *,
    headers: Mapping[str, str] | None = None,
    skip: Callable[[str, str], bool] = lambda method, path: False,
) -> tuple[dict[str, int], dict[int, int]]:
    """Fuzz every operation of ``base_url``'s OpenAPI schema; assert no 5xx and no hang (30 s).

    Returns (cases per operation, count per status).
    """
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings

    schema = schemathesis.openapi.from_url(f"{base_url}/openapi.json", headers=dict(headers or {}))
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
            response = case.call(base_url=base_url, headers=dict(headers or {}), timeout=30)
            statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
            tried[name] = tried.get(name, 0) + 1
            assert response.status_code < 500, (name, case.body, response.text[:300])

        check()

    for operation in schema.get_all_operations():
        op = operation.ok()
        if not skip(op.method.upper(), op.path):
            fuzz(op)
    return tried, statuses


def fuzz_figures(tried: dict[str, int], statuses: dict[int, int]) -> dict[str, Any]:
    return {
        **{f"cases {k}": v for k, v in sorted(tried.items())},
        "cases total": sum(tried.values()),
        "statuses seen": ", ".join(f"{k}×{v}" for k, v in sorted(statuses.items())),
        "5xx": 0,
    }
