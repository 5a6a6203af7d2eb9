"""The worker as users run it: real `mole worker` processes on loopback with the tiny demo model."""

from __future__ import annotations

import asyncio
import base64
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from support import demo_mapping_copy, worker_process

from mole import synthetic
from mole.supervisor import ServiceProcess
from shared.images import encode_image_b64

TOKEN = "worker-secret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def mapping(demo_assets: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return demo_mapping_copy(demo_assets, tmp_path_factory.mktemp("worker"))


@pytest.fixture(scope="module")
def logs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("worker-logs")


@pytest.fixture(scope="module")
def first_probe(mapping: Path, logs: Path) -> Iterator[tuple[ServiceProcess, list[int]]]:
    """The dynamic worker (token-protected, small prompt limit), with the statuses its readiness
    probe answered while it was loading."""
    svc = worker_process(
        mapping, "dynamic-0", logs, env={"MOLE_WORKER_TOKEN": TOKEN, "MOLE_MAX_PROMPT_CHARS": "512"}
    )
    statuses: list[int] = []
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and 200 not in statuses:
        try:
            statuses.append(httpx.get(f"{svc.url}/health/ready", timeout=2).status_code)
        except httpx.HTTPError:
            pass
        time.sleep(0.02)
    svc.wait_ready()
    yield svc, statuses
    svc.stop()


@pytest.fixture(scope="module")
def dynamic(first_probe: tuple[ServiceProcess, list[int]]) -> ServiceProcess:
    return first_probe[0]


@pytest.fixture(scope="module")
def merged(mapping: Path, logs: Path) -> Iterator[ServiceProcess]:
    svc = worker_process(mapping, "merged-calendar", logs)
    svc.wait_ready()
    yield svc
    svc.stop()


def request(sample: synthetic.Sample, adapter: str, **extra: object) -> dict:
    return {"image_b64": encode_image_b64(sample.image), "prompt": sample.prompt, "adapter": adapter, **extra}


def test_readiness_is_503_while_loading_then_200(first_probe: tuple[ServiceProcess, list[int]]) -> None:
    svc, statuses = first_probe
    assert statuses[0] == 503, statuses[:5]
    assert statuses[-1] == 200
    body = httpx.get(f"{svc.url}/health/ready").json()
    assert body["status"] == "ready"
    held = {a["name"]: a["sha256"] for a in body["adapters"]}
    assert set(held) == {"calendar", "claim", "login", "desktop"}
    assert all(re.fullmatch(r"[0-9a-f]{64}", h) for h in held.values())


def test_info_describes_the_worker(
    dynamic: ServiceProcess, merged: ServiceProcess, demo_assets: Path
) -> None:
    assert httpx.get(f"{dynamic.url}/info").status_code == 401  # names model paths: behind the token
    info = httpx.get(f"{dynamic.url}/info", headers=AUTH).json()
    assert info["worker_id"] == "dynamic-0" and info["mode"] == "dynamic"
    assert info["adapters"] == ["calendar", "claim", "desktop", "login"]
    assert Path(info["base_model"]) == (demo_assets / "base").resolve()
    assert (info["device"], info["dtype"]) == ("cpu", "float32")
    assert info["max_batch_size"] == 8 and info["max_new_tokens_cap"] == 1024
    info = httpx.get(f"{merged.url}/info").json()
    assert (info["mode"], info["adapters"]) == ("merged", ["calendar"])


def test_merged_and_dynamic_workers_agree(dynamic: ServiceProcess, merged: ServiceProcess) -> None:
    samples = synthetic.make_samples(8, seed=77, kinds=("calendar",))
    for s in samples:
        a = httpx.post(f"{merged.url}/infer", json=request(s, "calendar"), timeout=30)
        b = httpx.post(f"{dynamic.url}/infer", json=request(s, "calendar"), headers=AUTH, timeout=30)
        assert a.status_code == b.status_code == 200, (a.text, b.text)
        assert (a.json()["mode"], b.json()["mode"]) == ("merged", "dynamic")
        assert a.json()["output"] == b.json()["output"]
        assert synthetic.EXPERT_FORMATS["calendar"].match(a.json()["output"])


def _batch_counts(metrics: str) -> tuple[float, float]:
    """(batches, batches of one row) from the worker's batch-size histogram."""
    total = float(re.search(r"^mole_worker_batch_size_count (\S+)", metrics, re.M).group(1))  # type: ignore[union-attr]
    singles = float(re.search(r'^mole_worker_batch_size_bucket\{le="1.0"\} (\S+)', metrics, re.M).group(1))  # type: ignore[union-attr]
    return total, singles


def test_concurrent_mixed_adapters_match_requests_served_alone(dynamic: ServiceProcess) -> None:
    adapters = ("calendar", "claim", "login")
    samples = synthetic.make_samples(24, seed=5)
    bodies = [request(s, adapters[i % 3]) for i, s in enumerate(samples)]
    alone = []
    for body in bodies:
        r = httpx.post(f"{dynamic.url}/infer", json=body, headers=AUTH, timeout=30)
        assert r.status_code == 200, r.text
        alone.append(r.json()["output"])
    before = _batch_counts(httpx.get(f"{dynamic.url}/metrics", headers=AUTH).text)

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=60, headers=AUTH) as client:
            return await asyncio.gather(*(client.post(f"{dynamic.url}/infer", json=b) for b in bodies))

    together = asyncio.run(burst())
    assert [r.status_code for r in together] == [200] * 24
    assert [r.json()["output"] for r in together] == alone
    for body, r in zip(bodies, together, strict=True):
        assert synthetic.EXPERT_FORMATS[body["adapter"]].match(r.json()["output"])
    after = _batch_counts(httpx.get(f"{dynamic.url}/metrics", headers=AUTH).text)
    batches, singles = after[0] - before[0], after[1] - before[1]
    assert batches < 24 and singles < batches, "concurrent requests were not batched"


def test_worker_token_is_required(dynamic: ServiceProcess) -> None:
    body = request(synthetic.make_samples(1, seed=1)[0], "login")
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
        r = httpx.post(f"{dynamic.url}/infer", json=body, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
    r = httpx.post(f"{dynamic.url}/infer", params={"token": TOKEN}, json=body)
    assert r.status_code == 401, "a token in the query string must not be accepted"
    assert httpx.get(f"{dynamic.url}/health/ready").status_code == 200  # probes stay open
    assert httpx.get(f"{dynamic.url}/metrics").status_code == 401  # the worker token (or a metrics token)
    assert httpx.get(f"{dynamic.url}/metrics", headers=AUTH).status_code == 200
    assert TOKEN not in dynamic.log_path.read_text()


def test_rejections_name_the_field_and_the_limit(dynamic: ServiceProcess) -> None:
    sample = synthetic.make_samples(1, seed=2)[0]

    def post(body: dict) -> httpx.Response:
        return httpx.post(f"{dynamic.url}/infer", json=body, headers=AUTH, timeout=30)

    r = post(request(sample, "ocr"))
    assert r.status_code == 404
    assert r.json()["error"]["adapters"] == ["calendar", "claim", "desktop", "login"]
    assert "ocr" in r.json()["error"]["message"]

    r = post({**request(sample, "login"), "image_b64": "not base64 at all!"})
    assert r.status_code == 400 and "image_b64" in r.json()["error"]["message"]

    r = post({**request(sample, "login"), "image_b64": base64.b64encode(b"%PDF-1.4 not an image").decode()})
    assert r.status_code == 400 and "image_b64" in r.json()["error"]["message"]

    r = post({**request(sample, "login"), "prompt": "x" * 1000})
    assert r.status_code == 413
    assert r.json()["error"]["field"] == "prompt" and r.json()["error"]["limit"] == 512

    r = post({**request(sample, "login"), "prompt": "x" * 5000})
    assert r.status_code == 422 and "prompt" in r.json()["error"]["message"]

    r = post(request(sample, "login", max_new_tokens=2000))
    assert r.status_code == 400
    assert r.json()["error"]["field"] == "max_new_tokens" and "1024" in r.json()["error"]["message"]

    r = post(request(sample, "login", max_new_tokens=10**9))
    assert r.status_code == 422 and "max_new_tokens" in r.json()["error"]["message"]

    r = post({**request(sample, "login"), "unexpected": 1})
    assert r.status_code == 422 and "unexpected" in r.json()["error"]["message"]


def test_a_request_that_breaks_generation_fails_alone(dynamic: ServiceProcess) -> None:
    from PIL import Image

    good = synthetic.make_samples(3, seed=8, kinds=("login",))
    bad = request(good[0], "login")
    bad["image_b64"] = encode_image_b64(Image.new("RGB", (4000, 10), (10, 200, 10)))  # aspect 400:1
    bodies = [request(s, "login") for s in good]

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=60, headers=AUTH) as client:
            return await asyncio.gather(
                *(client.post(f"{dynamic.url}/infer", json=b) for b in [bad, *bodies])
            )

    responses = asyncio.run(burst())
    assert responses[0].status_code == 400
    assert "aspect ratio" in responses[0].json()["error"]["message"]
    for r in responses[1:]:
        assert r.status_code == 200
        assert r.json()["output"].startswith("login button")
    again = httpx.post(f"{dynamic.url}/infer", json=bodies[0], headers=AUTH, timeout=30)
    assert again.status_code == 200, "the worker must keep serving after a failed request"


def test_hot_adapter_load_and_unload(dynamic: ServiceProcess, demo_assets: Path) -> None:
    sample = synthetic.make_samples(1, seed=3, kinds=("desktop",))[0]
    path = str(demo_assets / "loras" / "desktop" / "adapter")
    r = httpx.post(f"{dynamic.url}/adapters", json={"name": "desktop-v2", "path": path})
    assert r.status_code == 401
    r = httpx.post(f"{dynamic.url}/adapters", json={"name": "desktop-v2", "path": path}, headers=AUTH)
    assert r.status_code == 200, r.text
    ready = httpx.get(f"{dynamic.url}/health/ready").json()
    hashes = {a["name"]: a["sha256"] for a in ready["adapters"]}
    assert hashes["desktop-v2"] == hashes["desktop"]
    a = httpx.post(f"{dynamic.url}/infer", json=request(sample, "desktop"), headers=AUTH, timeout=30)
    b = httpx.post(f"{dynamic.url}/infer", json=request(sample, "desktop-v2"), headers=AUTH, timeout=30)
    assert a.json()["output"] == b.json()["output"]

    r = httpx.post(f"{dynamic.url}/adapters", json={"name": "bad", "path": "/nonexistent"}, headers=AUTH)
    assert r.status_code == 400 and "adapter_config.json" in r.json()["error"]["message"]
    r = httpx.delete(f"{dynamic.url}/adapters/desktop-v2", headers=AUTH)
    assert r.status_code == 200
    r = httpx.post(f"{dynamic.url}/infer", json=request(sample, "desktop-v2"), headers=AUTH, timeout=30)
    assert r.status_code == 404
    assert httpx.delete(f"{dynamic.url}/adapters/desktop-v2", headers=AUTH).status_code == 404


def test_oversized_body_is_refused_before_reading(merged: ServiceProcess) -> None:
    r = httpx.post(
        f"{merged.url}/infer",
        content=b'{"image_b64": "' + b"A" * 13_000_000 + b'"}',
        headers={"content-type": "application/json"},
        timeout=30,
    )
    assert r.status_code == 413 and "12000000" in r.json()["error"]["message"]


def test_overload_answers_429_with_retry_after_and_recovers(mapping: Path, logs: Path) -> None:
    svc = worker_process(
        mapping,
        "merged-claim",
        logs,
        env={"MOLE_MAX_QUEUE": "2", "MOLE_MAX_BATCH_SIZE": "1", "MOLE_MAX_WAIT_MS": "0"},
    )
    try:
        svc.wait_ready()
        samples = synthetic.make_samples(24, seed=9, kinds=("claim",))

        async def burst() -> list[httpx.Response]:
            async with httpx.AsyncClient(timeout=60) as client:
                return await asyncio.gather(
                    *(client.post(f"{svc.url}/infer", json=request(s, "claim")) for s in samples)
                )

        responses = asyncio.run(burst())
        codes = [r.status_code for r in responses]
        assert set(codes) <= {200, 429}
        assert 429 in codes and 200 in codes
        for r in responses:
            if r.status_code == 429:
                assert int(r.headers["Retry-After"]) >= 1
                assert r.json()["error"]["code"] == "overloaded"
            else:
                assert r.json()["output"].startswith("CLAIM status=")
        r = httpx.post(f"{svc.url}/infer", json=request(samples[0], "claim"), timeout=30)
        assert r.status_code == 200, "the worker must recover as soon as load drops"

        # graceful shutdown: requests in flight when SIGTERM arrives still complete
        async def drain() -> list[httpx.Response]:
            async with httpx.AsyncClient(timeout=60) as client:
                tasks = [
                    asyncio.create_task(client.post(f"{svc.url}/infer", json=request(s, "claim")))
                    for s in samples[:2]  # the queue holds 2: none of these may be refused
                ]
                await asyncio.sleep(0.3)
                svc.proc.send_signal(signal.SIGTERM)
                return await asyncio.gather(*tasks)

        assert [r.status_code for r in asyncio.run(drain())] == [200, 200]
        svc.proc.wait(30)
    finally:
        svc.stop()
