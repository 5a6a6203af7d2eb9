"""Monolithic mode end to end: one real ``mole coordinator`` process serving the router and the
dynamic worker's experts from one base model (``"monolithic": true``, only the dynamic worker listed).
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from support import coordinator_process, demo_mapping_copy, free_port

from mole import synthetic
from mole.monolithic import inprocess_worker
from mole.supervisor import ServiceProcess, Stack
from shared.checkpoints import weights_hash
from shared.errors import ConfigError
from shared.images import encode_image_b64, image_to_data_url
from shared.mapping import load_mapping

WORKER_ID = "dynamic-0"
ADAPTERS = {"calendar", "claim", "login", "desktop"}
DISPATCH = {"probe_interval_s": 0.3, "request_timeout_s": 30.0}
ENV = {"MOLE_LOG_JSON": "false", "MOLE_LOG_LEVEL": "INFO"}


@dataclass
class Mono:
    assets: Path
    mapping: Path
    proc: ServiceProcess

    @property
    def url(self) -> str:
        return self.proc.url

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=60.0)


@pytest.fixture(scope="module")
def mono(demo_assets: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mono]:
    root = tmp_path_factory.mktemp("monolithic")
    dynamic = {
        "id": WORKER_ID,
        "url": f"http://127.0.0.1:{free_port()}",  # nothing listens there: the worker is in-process
        "mode": "dynamic",
        "adapters": sorted(ADAPTERS),
    }
    mapping = demo_mapping_copy(demo_assets, root, monolithic=True, workers=[dynamic], dispatch=DISPATCH)
    proc = coordinator_process(mapping, root, env=ENV)
    try:
        proc.wait_ready(90)
        yield Mono(demo_assets, mapping, proc)
    finally:
        proc.stop()


def _body(sample: synthetic.Sample, **extra: Any) -> dict[str, Any]:
    return {"image_b64": encode_image_b64(sample.image), "prompt": sample.prompt, **extra}


def test_routes_heldout_screens_and_answers_in_each_experts_format(mono: Mono) -> None:
    samples = synthetic.make_samples(24, seed=9090)
    with mono.client() as client:
        bodies = [client.post("/classify", json=_body(s)).json() for s in samples]
    right = [b["adapter"] == s.kind for b, s in zip(bodies, samples, strict=True)]
    assert sum(right) / len(samples) >= 0.95, [b["adapter"] for b in bodies]
    for body, sample, ok in zip(bodies, samples, right, strict=True):
        assert (body["mode"], body["worker_id"], body["routed_by"]) == ("dynamic", WORKER_ID, "router")
        assert 0.0 < body["confidence"] <= 1.0 and body["degraded"] is False
        if ok:
            assert synthetic.EXPERT_FORMATS[sample.kind].match(body["output"]), body["output"]


def test_explicit_expert_skips_the_router(mono: Mono) -> None:
    claim = next(s for s in synthetic.make_samples(4, seed=31) if s.kind == "claim")
    with mono.client() as client:
        by_name = client.post("/classify", json=_body(claim, expert="login")).json()
        by_label = client.post("/infer_web", json=_body(claim, expert=2)).json()
        unknown = client.post("/classify", json=_body(claim, expert="__router__"))
    assert (by_name["adapter"], by_name["routed_by"], by_name["confidence"]) == ("login", "explicit", None)
    assert by_name["mode"] == "dynamic" and synthetic.EXPERT_FORMATS["login"].match(by_name["output"])
    assert by_label["routed_adapter"] == "login" and by_label["task_output"] == by_name["output"]
    assert unknown.status_code == 404  # the router LoRA is never served as an expert


def test_a_stream_from_the_in_process_worker_is_the_plain_answer(mono: Mono) -> None:
    sample = next(s for s in synthetic.make_samples(4, seed=32) if s.kind == "desktop")
    user = {
        "role": "user",
        "content": [
            {"type": "image_url", "image_url": {"url": image_to_data_url(sample.image)}},
            {"type": "text", "text": sample.prompt},
        ],
    }
    body = {"model": "auto", "messages": [user]}
    with mono.client() as client:
        plain = client.post("/v1/chat/completions", json=body).json()
        with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as resp:
            events = [line[6:] for line in resp.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == plain["choices"][0]["message"]["content"] and len(chunks) > 3
    assert synthetic.EXPERT_FORMATS["desktop"].match(text) and chunks[-1]["model"] == "desktop"


def test_workers_lists_the_in_process_worker_as_up(mono: Mono) -> None:
    with mono.client() as client:
        workers = client.get("/workers").json()["workers"]
        ready = client.get("/health/ready").json()
    assert [w["id"] for w in workers] == [WORKER_ID]
    row = workers[0]
    assert (row["state"], row["mode"], row["available"]) == ("up", "dynamic", True)
    reported = {a["name"]: a["sha256"] for a in row["reported_adapters"]}
    assert set(reported) == ADAPTERS and row["missing_adapters"] == [] and row["extra_adapters"] == []
    assert reported["login"] == weights_hash(mono.assets / "loras/login/adapter")
    assert ready["workers_up"] == 1


def test_concurrent_requests_match_sequential_ones(mono: Mono) -> None:
    samples = synthetic.make_samples(16, seed=515)
    bodies = [_body(s) if i % 2 else _body(s, expert=sorted(ADAPTERS)[i % 4]) for i, s in enumerate(samples)]
    with mono.client() as client:
        alone = [client.post("/classify", json=b).json() for b in bodies]

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=mono.url, timeout=60.0) as client:
            return await asyncio.gather(*(client.post("/classify", json=b) for b in bodies))

    together = asyncio.run(burst())
    assert [r.status_code for r in together] == [200] * len(bodies), [r.text for r in together]
    for a, r in zip(alone, together, strict=True):
        b = r.json()
        assert (b["adapter"], b["routed_by"], b["output"]) == (a["adapter"], a["routed_by"], a["output"])
        if a["confidence"] is not None:
            assert b["confidence"] == pytest.approx(a["confidence"], abs=1e-3)


def test_one_process_and_one_model_for_router_and_experts(mono: Mono) -> None:
    proc = psutil.Process(mono.proc.proc.pid)
    assert proc.children(recursive=True) == []  # no worker process was started
    worker_url = json.loads(mono.mapping.read_text())["workers"][0]["url"]
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{worker_url}/health/ready", timeout=2.0)
    log = mono.proc.log_path.read_text()
    # The model the worker lends and the one every router runs on are one object, loaded once.
    lent = re.findall(r"share one model .*model_id=(0x[0-9a-f]+)", log)
    router = re.findall(r"router loaded .*model_id=(0x[0-9a-f]+)", log)
    assert lent and router == lent and set(lent) == {lent[0]}, log[-3000:]
    assert "shared_model=False" not in log
    assert len(re.findall(r"dynamic worker loaded \d+ adapters", log)) == 1


def test_reload_lends_the_new_router_the_same_model(mono: Mono, tmp_path: Path) -> None:
    good = mono.mapping.read_text()
    doc = json.loads(good)
    copied = tmp_path / "router-copy"
    shutil.copytree(doc["router"]["adapter"], copied)
    try:
        with mono.client() as client:
            doc["router"]["adapter"] = str(copied)
            mono.mapping.write_text(json.dumps(doc))
            assert client.post("/admin/reload").json()["status"] == "reloaded"
            sample = synthetic.make_samples(3, seed=8)[2]
            served = client.post("/classify", json=_body(sample)).json()
            assert served["adapter"] == sample.kind and served["routed_by"] == "router"

            other_base = {**doc, "base_model": str(mono.assets / "merged/calendar")}
            mono.mapping.write_text(json.dumps(other_base))
            rejected = client.post("/admin/reload")
            assert rejected.status_code == 400 and "one base model" in rejected.json()["error"]["message"]
    finally:
        mono.mapping.write_text(good)
        httpx.post(f"{mono.url}/admin/reload", timeout=60.0)
    log = mono.proc.log_path.read_text()
    assert "loaded hidden adapter __router__2" in log and "unloaded hidden adapter __router__\n" in log
    assert "shared_model=False" not in log


def test_mole_up_starts_no_process_for_the_in_process_worker(demo_assets: Path, tmp_path: Path) -> None:
    mapping = demo_mapping_copy(demo_assets, tmp_path, monolithic=True)  # merged workers stay processes
    stack = Stack(mapping, run_dir=tmp_path / "run")
    assert [s.name for s in stack.services] == ["merged-calendar", "merged-claim", "coordinator"]
    assert stack.inprocess_worker == WORKER_ID and "in-process" in stack.table()


def test_the_in_process_worker_must_run_on_the_base_model(demo_assets: Path, tmp_path: Path) -> None:
    path = demo_mapping_copy(demo_assets, tmp_path, monolithic=True)
    doc = json.loads(path.read_text())
    doc["workers"][2]["model"] = str(demo_assets / "merged/calendar")
    path.write_text(json.dumps(doc))
    with pytest.raises(ConfigError, match=r'workers "dynamic-0".model .* must be the base_model'):
        inprocess_worker(load_mapping(path))
