"""End-to-end: real worker processes and coordinators on loopback with the demo assets.

One stack for the module: the three demo workers (``mole worker`` processes), a hanging fake worker
(fault injection only), a coordinator in-process (uvicorn on a thread) and a real ``mole coordinator``
process. Each coordinator has its own copy of the mapping so reload tests do not disturb the workers.
"""

from __future__ import annotations

import json
import re
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from pydantic import SecretStr
from support import (
    REPO,
    ThreadServer,
    coordinator_process,
    demo_mapping_copy,
    free_port,
    misbehaving_worker,
    wait_for,
    worker_process,
)

from coordinator.app import create_app
from mole import synthetic
from mole.supervisor import ServiceProcess
from shared.checkpoints import weights_hash
from shared.images import encode_image_b64, image_to_data_url
from shared.settings import Settings

API_KEY = "test-key"
WORKER_TOKEN = "worker-secret"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
WORKER_TIMEOUT_S = 5.0  # dispatch.request_timeout_s: the hanging worker's 504 comes after this
DISPATCH = {
    "prefer_merged": True,
    "fallback_to_dynamic": True,
    "connect_timeout_s": 1.0,
    "request_timeout_s": WORKER_TIMEOUT_S,
    "retries": 1,
    "probe_interval_s": 0.3,
    "eject_after_failures": 3,
    "eject_base_s": 2.0,
}
DEMO_WORKERS = ("merged-calendar", "merged-claim", "dynamic-0")
WORKER_ENV = {"MOLE_WORKER_TOKEN": WORKER_TOKEN, "MOLE_MAX_NEW_TOKENS_CAP": "64"}


@dataclass
class Stack:
    assets: Path
    mapping: Path  # what the workers read
    inproc_mapping: Path  # the in-process coordinator's copy
    proc_mapping: Path  # the coordinator process's copy
    url: str  # in-process coordinator
    proc_url: str  # coordinator process
    workers: dict[str, ServiceProcess]
    proc: ServiceProcess
    log_dir: Path

    def client(self, **kw: Any) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=60.0, **kw)

    def restart_worker(self, worker_id: str) -> ServiceProcess:
        self.workers[worker_id] = worker_process(self.mapping, worker_id, self.log_dir, env=WORKER_ENV)
        return self.workers[worker_id]


def _write_mapping(assets: Path, out_dir: Path, hang_port: int, ghost_port: int) -> Path:
    """The demo mapping plus two unlabeled adapters: "slow" on a hanging worker and "ghost" on a
    worker that is never started."""
    path = demo_mapping_copy(assets, out_dir, dispatch=DISPATCH)
    doc = json.loads(path.read_text())
    login_lora = doc["adapters"]["login"]["lora"]
    for name, wid, port in (("slow", "hang-0", hang_port), ("ghost", "ghost-0", ghost_port)):
        doc["adapters"][name] = {"lora": login_lora, "description": f"test {name}"}
        doc["workers"].append(
            {"id": wid, "url": f"http://127.0.0.1:{port}", "mode": "dynamic", "adapters": [name]}
        )
    path.write_text(json.dumps(doc, indent=2))
    return path


@pytest.fixture(scope="module")
def stack(demo_assets: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("coordinator-e2e")
    hang_port, ghost_port = free_port(), free_port()
    mapping = _write_mapping(demo_assets, root, hang_port, ghost_port)
    inproc_mapping = root / "inproc.json"
    proc_mapping = root / "proc.json"
    inproc_mapping.write_text(mapping.read_text())
    proc_mapping.write_text(mapping.read_text())

    workers = {wid: worker_process(mapping, wid, root, env=WORKER_ENV) for wid in DEMO_WORKERS}
    proc = coordinator_process(
        proc_mapping, root, env={"MOLE_API_KEYS": API_KEY, "MOLE_WORKER_TOKEN": WORKER_TOKEN}
    )
    hang = ThreadServer(misbehaving_worker("hang-0", "slow", "hang"), hang_port)
    settings = Settings(
        api_keys=[API_KEY], worker_token=SecretStr(WORKER_TOKEN), torch_threads=1, request_timeout_s=30
    )
    inproc = ThreadServer(create_app(settings, inproc_mapping), free_port())
    stack = Stack(
        demo_assets, mapping, inproc_mapping, proc_mapping, inproc.url, proc.url, workers, proc, root
    )
    try:
        for service in workers.values():
            service.wait_ready(120)
        inproc.wait_started()
        proc.wait_ready(120)
        for url in (inproc.url, proc.url):
            wait_for(lambda url=url: _all_up(url), f"{url}: every demo worker probed up")
        yield stack
    finally:
        inproc.stop()
        hang.stop()
        proc.stop()
        for service in stack.workers.values():
            service.stop()


def _all_up(url: str) -> bool:
    workers = httpx.get(f"{url}/workers", headers=AUTH).json()["workers"]
    return all(w["state"] == "up" for w in workers if w["id"] in DEMO_WORKERS)


def _sample_body(sample: synthetic.Sample, **extra: Any) -> dict[str, Any]:
    return {"image_b64": encode_image_b64(sample.image), "prompt": sample.prompt, **extra}


def _workers(client: httpx.Client) -> dict[str, dict[str, Any]]:
    return {w["id"]: w for w in client.get("/workers", headers=AUTH).json()["workers"]}


# ---- routing ------------------------------------------------------------------------------------


def test_classify_routes_heldout_screens_to_the_right_expert(stack: Stack) -> None:
    samples = synthetic.make_samples(32, seed=4242)
    with stack.client(headers=AUTH) as client, ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda s: client.post("/classify", json=_sample_body(s)), samples))
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses if r.status_code != 200]
    bodies = [r.json() for r in responses]
    routed_right = [b["adapter"] == s.kind for b, s in zip(bodies, samples, strict=True)]
    assert sum(routed_right) / len(samples) >= 0.95
    for body, sample, ok in zip(bodies, samples, routed_right, strict=True):
        assert body["routed_by"] == "router"
        assert 0.0 < body["confidence"] <= 1.0
        assert set(body["timings_ms"]) >= {"route", "dispatch", "worker", "total"}
        assert body["top_k"][0]["adapter"] == body["adapter"]
        if ok:
            assert synthetic.EXPERT_FORMATS[sample.kind].match(body["output"]), body["output"]
        expected_worker = (
            f"merged-{body['adapter']}" if body["adapter"] in ("calendar", "claim") else "dynamic-0"
        )
        assert body["worker_id"] == expected_worker
        assert body["mode"] == ("merged" if expected_worker.startswith("merged") else "dynamic")
        assert body["degraded"] is False
    router_hash = weights_hash(stack.assets / "loras/router/adapter")
    assert responses[0].headers["X-Mole-Router-Version"] == router_hash
    assert responses[0].headers["X-Mole-Route-Top"].startswith(f"{bodies[0]['adapter']}=")


def test_explicit_expert_skips_the_router(stack: Stack) -> None:
    sample = synthetic.make_samples(3, seed=7)[2]  # a login screen
    with stack.client(headers=AUTH) as client:
        by_name = client.post("/classify", json=_sample_body(sample, expert="login")).json()
        by_label = client.post("/infer_web", json=_sample_body(sample, expert=2)).json()
        dynamic = client.post("/classify", json=_sample_body(sample, expert="calendar", prefer_merged=False))
    assert by_name["routed_by"] == "explicit" and by_name["confidence"] is None
    assert synthetic.EXPERT_FORMATS["login"].match(by_name["output"])
    assert by_label["routed_adapter"] == "login" and by_label["task_output"] == by_name["output"]
    assert dynamic.json()["worker_id"] == "dynamic-0" and dynamic.json()["degraded"] is False
    assert "X-Mole-Route-Top" not in dynamic.headers


def test_batch_one_bad_item_does_not_fail_the_others(stack: Stack) -> None:
    good = synthetic.make_samples(2, seed=11)
    items = [_sample_body(good[0]), {"image_b64": "not an image!", "prompt": "hi"}, _sample_body(good[1])]
    items.append(_sample_body(good[0], expert="no-such-expert"))
    with stack.client(headers=AUTH) as client:
        resp = client.post("/classify/batch", json={"items": items})
        stats = client.get("/classify/stats").json()
    assert resp.status_code == 200
    results = resp.json()["results"]
    assert [r["ok"] for r in results] == [True, False, True, False]
    assert results[1]["error"]["status"] == 400 and "image_b64" in results[1]["error"]["message"]
    assert results[3]["error"]["status"] == 404
    assert results[0]["result"]["adapter"] == good[0].kind
    assert stats["requests"] >= 2 and stats["errors"]["adapter_not_found"] >= 1


# ---- errors -------------------------------------------------------------------------------------


def test_wrong_or_missing_api_key_is_401_and_probes_stay_open(stack: Stack) -> None:
    body = _sample_body(synthetic.make_samples(1, seed=3)[0])
    with stack.client() as client:
        assert client.post("/classify", json=body).status_code == 401
        wrong = client.post("/classify", json=body, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "unauthorized"
        assert client.get("/v1/models").status_code == 401
        assert client.post("/admin/reload").status_code == 401
        for path in ("/health/live", "/health/ready"):
            assert client.get(path).status_code == 200, path
        for path in ("/metrics", "/workers", "/openapi.json", "/docs"):  # keyed once keys are set
            assert client.get(path).status_code == 401, path
            assert client.get(path, headers=AUTH).status_code == 200, path


def test_unknown_expert_is_404(stack: Stack) -> None:
    body = _sample_body(synthetic.make_samples(1, seed=3)[0], expert="astrology")
    with stack.client(headers=AUTH) as client:
        resp = client.post("/classify", json=body)
    assert resp.status_code == 404
    error = resp.json()["error"]
    assert error["code"] == "adapter_not_found" and "calendar" in error["adapters"]


def test_worker_rejection_is_passed_through(stack: Stack) -> None:
    # The answer's cap is the adapter's (or the worker's, 64 here): the worker's 400 comes back.
    body = _sample_body(synthetic.make_samples(1, seed=3)[0], expert="login", max_new_tokens=100)
    with stack.client(headers=AUTH) as client:
        resp = client.post("/classify", json=body)
    assert resp.status_code == 400 and resp.json()["error"]["field"] == "max_new_tokens"
    assert "64" in resp.json()["error"]["message"]


def test_no_worker_able_to_serve_is_503_naming_the_adapter(stack: Stack) -> None:
    body = _sample_body(synthetic.make_samples(1, seed=3)[0], expert="ghost")
    with stack.client(headers=AUTH) as client:
        resp = client.post("/classify", json=body)
    assert resp.status_code == 503
    error = resp.json()["error"]
    assert error["code"] == "no_worker_available" and error["adapter"] == "ghost"
    assert "ghost" in error["message"] and "ghost-0" in error["message"]


def test_hanging_worker_is_504_within_the_deadline(stack: Stack) -> None:
    body = _sample_body(synthetic.make_samples(1, seed=3)[0], expert="slow")
    with stack.client(headers=AUTH) as client:
        t0 = time.monotonic()
        resp = client.post("/classify", json=body)
        elapsed = time.monotonic() - t0
    assert resp.status_code == 504 and resp.json()["error"]["code"] == "worker_timeout"
    assert elapsed < WORKER_TIMEOUT_S + 5.0


# ---- failover -----------------------------------------------------------------------------------


def test_killed_merged_worker_falls_back_to_dynamic_and_returns_after_restart(stack: Stack) -> None:
    claim = next(s for s in synthetic.make_samples(8, seed=21) if s.kind == "claim")
    with stack.client(headers=AUTH) as client:
        stack.workers["merged-claim"].kill()
        for body in (_sample_body(claim), _sample_body(claim, expert="claim")):
            resp = client.post("/classify", json=body)
            assert resp.status_code == 200, resp.text
            served = resp.json()
            assert served["adapter"] == "claim" and served["worker_id"] == "dynamic-0"
            assert served["mode"] == "dynamic" and served["degraded"] is True
            assert synthetic.EXPERT_FORMATS["claim"].match(served["output"])
        wait_for(lambda: _workers(client)["merged-claim"]["state"] == "down", "merged-claim marked down")

        stack.restart_worker("merged-claim").wait_ready(120)
        wait_for(lambda: _workers(client)["merged-claim"]["state"] == "up", "merged-claim back up")
        served = client.post("/classify", json=_sample_body(claim)).json()
        assert served["worker_id"] == "merged-claim" and served["mode"] == "merged"
        assert served["degraded"] is False
        metrics = client.get("/metrics").text
    assert 'mole_coordinator_fallbacks_total{adapter="claim",reason="dynamic"}' in metrics
    assert 'mole_coordinator_worker_up{worker="merged-claim"} 1.0' in metrics


# ---- mapping reload -----------------------------------------------------------------------------


def test_reload_rejects_a_bad_mapping_and_keeps_the_old_one(stack: Stack) -> None:
    good = stack.inproc_mapping.read_text()
    doc = json.loads(good)
    doc["adapters"]["login"]["lora"] = "/nonexistent/login/adapter"
    try:
        with stack.client(headers=AUTH) as client:
            stack.inproc_mapping.write_text(json.dumps(doc))
            resp = client.post("/admin/reload")
            assert resp.status_code == 400
            error = resp.json()["error"]
            assert error["code"] == "invalid_mapping" and "/nonexistent/login/adapter" in error["message"]
            still = client.post("/classify", json=_sample_body(synthetic.make_samples(3, seed=5)[2]))
            assert still.status_code == 200 and still.json()["adapter"] == "login"

            doc = json.loads(good)
            del doc["adapters"]["ghost"]
            doc["workers"] = [w for w in doc["workers"] if w["id"] != "ghost-0"]
            stack.inproc_mapping.write_text(json.dumps(doc))
            assert client.post("/admin/reload").json()["status"] == "reloaded"
            assert "ghost-0" not in _workers(client)
            assert "ghost" not in [m["id"] for m in client.get("/v1/models").json()["data"]]
    finally:
        stack.inproc_mapping.write_text(good)
        httpx.post(f"{stack.url}/admin/reload", headers=AUTH)


def test_shadow_mode_serves_the_explicit_expert_and_records_router_agreement(stack: Stack) -> None:
    good = stack.inproc_mapping.read_text()
    doc = json.loads(good)
    doc["router"]["shadow"] = True
    login = synthetic.make_samples(3, seed=5)[2]
    try:
        with stack.client(headers=AUTH) as client:
            stack.inproc_mapping.write_text(json.dumps(doc))
            assert client.post("/admin/reload").status_code == 200
            before = client.get("/classify/stats").json()["shadow"]
            agree = client.post("/classify", json=_sample_body(login, expert="login"))
            disagree = client.post("/classify", json=_sample_body(login, expert="desktop")).json()
            after = client.get("/classify/stats").json()["shadow"]
    finally:
        stack.inproc_mapping.write_text(good)
        httpx.post(f"{stack.url}/admin/reload", headers=AUTH)
    assert agree.json()["adapter"] == "login" and agree.json()["routed_by"] == "explicit"
    assert agree.json()["top_k"][0]["adapter"] == "login" and "X-Mole-Route-Top" in agree.headers
    assert disagree["adapter"] == "desktop" and disagree["worker_id"] == "dynamic-0"
    assert after["enabled"] and after["decisions"] == before["decisions"] + 2
    assert after["agreements"] == before["agreements"] + 1


def test_sighup_reloads_the_coordinator_process(stack: Stack) -> None:
    def models() -> list[str]:
        resp = httpx.get(f"{stack.proc_url}/v1/models", headers=AUTH)
        return [m["id"] for m in resp.json()["data"]]

    assert "ghost" in models()
    stack.proc_mapping.write_text("{not json")
    stack.proc.proc.send_signal(signal.SIGHUP)
    time.sleep(1.0)
    assert stack.proc.proc.poll() is None and "ghost" in models()
    doc = json.loads(stack.mapping.read_text())
    del doc["adapters"]["ghost"]
    doc["workers"] = [w for w in doc["workers"] if w["id"] != "ghost-0"]
    stack.proc_mapping.write_text(json.dumps(doc))
    stack.proc.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "ghost" not in models(), "SIGHUP reload")


# ---- OpenAI compatibility -----------------------------------------------------------------------


def test_openai_client_gets_a_chat_completion_with_an_image(stack: Stack) -> None:
    import openai

    sample = next(s for s in synthetic.make_samples(8, seed=9) if s.kind == "desktop")
    client = openai.OpenAI(base_url=f"{stack.proc_url}/v1", api_key=API_KEY, max_retries=0)
    content: list[Any] = [
        {"type": "text", "text": sample.prompt},
        {"type": "image_url", "image_url": {"url": image_to_data_url(sample.image)}},
    ]
    completion = client.chat.completions.create(
        model="auto", messages=[{"role": "user", "content": content}], max_tokens=16
    )
    assert completion.object == "chat.completion" and completion.model == "desktop"
    text = completion.choices[0].message.content or ""
    assert synthetic.EXPERT_FORMATS["desktop"].match(text), text
    assert completion.usage is not None and completion.usage.completion_tokens > 0
    assert "auto" in [m.id for m in client.models.list().data]

    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{stack.proc_url}/v1", api_key="wrong", max_retries=0).models.list()
    fetch = [content[0], {"type": "image_url", "image_url": {"url": "https://example.com/x.png"}}]
    with pytest.raises(openai.BadRequestError, match="never fetched"):
        client.chat.completions.create(model="auto", messages=[{"role": "user", "content": fetch}])
    with pytest.raises(openai.BadRequestError, match="logit_bias"):
        client.chat.completions.create(
            model="desktop", messages=[{"role": "user", "content": content}], logit_bias={"1": 5}
        )


def test_dashboard_and_alerts_use_only_exported_metrics(stack: Stack) -> None:
    """Every ``mole_*`` name in the Grafana dashboard and the Prometheus alert rules (docker/) is
    exported by the live coordinator or workers, and no ``*_created`` series is exported."""
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
    exported: set[str] = set()
    texts = [httpx.get(f"{url}/metrics", headers=AUTH).text for url in (stack.url, stack.proc_url)]
    worker_auth = {"Authorization": f"Bearer {WORKER_TOKEN}"}  # /metrics takes the service's credential
    texts += [httpx.get(f"{w.probe_url}/metrics", headers=worker_auth).text for w in stack.workers.values()]
    for text in texts:
        assert "_created" not in text
        for family in text_string_to_metric_families(text):
            exported |= {family.name + suffix for suffix in suffixes.get(family.type, ("",))}
    dashboard = json.loads((REPO / "docker/grafana/dashboards/mole.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    rules = yaml.safe_load((REPO / "docker/prometheus/alerts.yml").read_text())
    exprs += [r["expr"] for g in rules["groups"] for r in g["rules"]]
    used = {name for expr in exprs for name in re.findall(r"\bmole_[a-z0-9_]+", expr)}
    assert len(used) >= 20
    assert sorted(used - exported) == []
