"""modal_deploy/: the plain specs built from the mapping, the Modal module imported offline, the
dry-run plan, and the container-side loading of a real tiny worker."""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
from support import REPO, demo_mapping_copy, production_on_vllm, vllm_env

from modal_deploy.serving import ContainerApp, load, vllm_command, volume_refresher
from modal_deploy.spec import (
    CONTAINER_ENV,
    DEFAULT_CPU,
    DEFAULT_MEMORY_MIB,
    SPEC_ENV,
    VLLM_PORT,
    VOLUMES,
    AppSpec,
    build_specs,
    image_packages,
    load_for_modal,
    spec_from_env,
    worker_url_vars,
)
from mole.cli import main
from mole.vllm_serve import VLLM_IMAGE, VLLM_VERSION, server_command
from shared.errors import ConfigError
from shared.mapping import MoleMapping, load_mapping

MAPPING = REPO / "config" / "expert_machine_mapping.json"


def _edited(tmp_path: Path, edit: Any) -> MoleMapping:
    doc = json.loads(MAPPING.read_text())
    edit(doc)
    path = tmp_path / "mapping.json"
    path.write_text(json.dumps(doc))
    return load_for_modal(str(path), environ={})


def test_one_app_per_worker_then_the_coordinator() -> None:
    mapping = load_for_modal(str(MAPPING), environ={})
    specs = build_specs(mapping, workspace="acme")
    assert [s.worker_id for s in specs] == [*(w.id for w in mapping.workers), None]
    assert len({s.name for s in specs}) == len(specs)
    for spec, w in zip(specs, mapping.workers, strict=False):
        assert spec.role == "worker"
        assert spec.gpu == (w.gpu or "H100")
        assert (spec.min_containers, spec.max_containers) == (w.min_containers, w.max_containers)
        assert spec.scaledown_window_s == w.scaledown_window_s
        assert spec.max_concurrency == w.max_concurrency
        assert (spec.cpu, spec.memory_mib, spec.region) == (DEFAULT_CPU, DEFAULT_MEMORY_MIB, None)
        assert spec.volumes == VOLUMES and {"/models", "/vol"} <= set(spec.volumes)
        assert "MOLE_WORKER_TOKEN" in spec.required_secret_keys  # no proxy auth: the token instead
        assert spec.requires_proxy_auth is False
        assert spec.env == CONTAINER_ENV
        assert spec.url("acme") == f"https://acme--mole-{w.id}.modal.run"
    coordinator = specs[-1]
    assert coordinator.gpu == "H100"  # the router runs in the coordinator
    assert coordinator.requires_proxy_auth is True and coordinator.env["MOLE_ENV"] == "production"
    assert {"MOLE_WORKER_TOKEN", "MOLE_API_KEYS"} <= set(coordinator.required_secret_keys)
    # The coordinator's copy of the mapping resolves every worker to its Modal endpoint.
    seen = load_for_modal(str(MAPPING), environ=coordinator.env)
    assert {w.id: w.url for w in seen.workers} == {s.worker_id: s.url("acme") for s in specs[:-1]}


def test_deployed_worker_urls_reach_the_coordinator() -> None:
    mapping = load_for_modal(str(MAPPING), environ={})
    urls = {w.id: f"https://real--{w.id}.modal.run" for w in mapping.workers}
    coordinator = build_specs(mapping, worker_urls=urls, coordinator_proxy_auth=False)[-1]
    assert coordinator.requires_proxy_auth is False
    assert {coordinator.env[var] for var in worker_url_vars(mapping).values()} == set(urls.values())


def test_gpu_default_and_paths_follow_the_container_env(tmp_path: Path) -> None:
    def edit(doc: dict[str, Any]) -> None:
        del doc["workers"][2]["gpu"]
        doc["workers"][0]["gpu"] = "a100-80gb:2"

    specs = build_specs(_edited(tmp_path, edit), coordinator=False)
    assert [s.gpu for s in specs] == ["A100-80GB:2", "H100", "H100"]
    # The deployer's own MOLE_VOLUME does not leak into the container's paths.
    assert load_for_modal(str(MAPPING), environ={"MOLE_VOLUME": "/home/me/vol"}).workers[0].model == (
        "/vol/merged/calendar"
    )


def test_resources_and_region_come_from_the_worker_else_the_defaults(tmp_path: Path) -> None:
    def edit(doc: dict[str, Any]) -> None:
        doc["workers"][0].update(cpu=16, memory_mib=131072, region="eu-west")

    specs = build_specs(_edited(tmp_path, edit), region="us-east")
    assert [(s.cpu, s.memory_mib, s.region) for s in specs] == [
        (16, 131072, "eu-west"),
        (DEFAULT_CPU, DEFAULT_MEMORY_MIB, "us-east"),
        (DEFAULT_CPU, DEFAULT_MEMORY_MIB, "us-east"),
        (DEFAULT_CPU, DEFAULT_MEMORY_MIB, "us-east"),  # the coordinator
    ]
    assert DEFAULT_CPU >= 4 and DEFAULT_MEMORY_MIB >= 32 * 1024  # not Modal's fraction of a core


def test_the_image_adds_torchvision_resolved_against_the_torch_pin(tmp_path: Path) -> None:
    packages = image_packages(REPO / "pyproject.toml")
    assert packages[0].startswith("torch==") and "torchvision" in packages
    unpinned = tmp_path / "pyproject.toml"
    unpinned.write_text('[project]\ndependencies = ["torch>=2"]\n')
    with pytest.raises(ConfigError, match="not pinned"):
        image_packages(unpinned)


def test_volume_refresher_reloads_every_volume_and_survives_a_refusal(
    caplog: pytest.LogCaptureFixture,
) -> None:
    calls: list[str] = []

    class Volume:  # Modal's volume cannot run here; this stands in for its reload()
        def __init__(self, name: str, fail: bool = False):
            self.name, self.fail = name, fail

        def reload(self) -> None:
            calls.append(self.name)
            if self.fail:
                raise RuntimeError("there are open files")

    volume_refresher([Volume("vol", fail=True), Volume("models")])()
    assert calls == ["vol", "models"] and "open files" in caplog.text


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d["workers"][1].update(gpu="H1000"), 'workers[1] "merged-claim": gpu'),
        (
            lambda d: d["workers"][0].update(scaledown_window_s=7200),
            'workers[0] "merged-calendar": scaledown',
        ),
        (
            lambda d: d["workers"][2].update(model="/data/base"),
            'workers[2] "dynamic-0": not on a Modal volume',
        ),
        (lambda d: d["router"].update(adapter="/data/router"), "coordinator: not on a Modal volume"),
        (lambda d: d["workers"][0].update(url="http://10.0.0.5:8000"), 'must be "${VAR:-default}"'),
    ],
)
def test_mapping_errors_name_the_entry(tmp_path: Path, edit: Any, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("$", r"\$")):
        build_specs(_edited(tmp_path, edit))


def test_spec_from_env_requires_the_deploy_command() -> None:
    with pytest.raises(ConfigError, match="mole modal-deploy"):
        spec_from_env({})
    spec = build_specs(load_for_modal(str(MAPPING), environ={}))[0]
    assert spec_from_env({SPEC_ENV: spec.model_dump_json()}) == spec


def test_modal_module_imports_offline() -> None:
    spec = build_specs(load_for_modal(str(MAPPING), environ={}))[-1]
    code = (
        "import modal_deploy.app as m, modal; "
        "assert isinstance(m.app, modal.App) and m.app.name == m.SPEC.name; print(m.SPEC.model_dump_json())"
    )
    env = {"PATH": "/usr/bin:/bin", "HOME": "/nonexistent", SPEC_ENV: spec.model_dump_json()}  # no token
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert AppSpec.model_validate_json(result.stdout) == spec


def test_dry_run_prints_the_plan_and_the_urls(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["modal-deploy", "--config", str(MAPPING), "--dry-run", "--workspace", "acme"]) == 0
    out = capsys.readouterr().out
    assert "MOLE_WORKER_DYNAMIC_0_URL=https://acme--mole-dynamic-0.modal.run" in out
    assert "https://acme--mole-coordinator.modal.run" in out and "proxy+api-key" in out


def test_container_loads_the_worker_before_serving(
    demo_assets: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What @modal.enter does: the worker is ready (200) on the first request, /infer needs the
    token, and Modal's own lifespan messages are acknowledged without loading twice."""
    monkeypatch.setenv("MOLE_WORKER_TOKEN", "t0ken")
    monkeypatch.setenv("MOLE_TORCH_THREADS", "1")
    mapping = demo_mapping_copy(demo_assets, tmp_path)
    base = build_specs(load_for_modal(str(MAPPING), environ={}), coordinator=False)[0]
    spec = base.model_copy(update={"worker_id": "merged-calendar"})
    reloads: list[int] = []
    container_app = load(spec, mapping, timeout_s=120, refresh_storage=lambda: reloads.append(1))
    try:
        statuses = asyncio.run(_exercise(container_app))
        assert statuses == {"ready": 200, "infer_without_token": 401, "lifespan": "ok", "load_adapter": 400}
        assert reloads == [1]  # the volume is reloaded before an adapter is read from it
    finally:
        container_app.close()


async def _exercise(container_app: ContainerApp) -> dict[str, Any]:
    transport = httpx.ASGITransport(app=container_app)  # type: ignore[arg-type]
    async with httpx.AsyncClient(transport=transport, base_url="http://modal") as client:
        ready = (await client.get("/health/ready")).status_code
        infer = (
            await client.post("/infer", json={"image_b64": "", "prompt": "x", "adapter": "c"})
        ).status_code
        adapter = (  # a merged worker refuses it, after the volume was reloaded
            await client.post(
                "/adapters",
                json={"name": "extra", "path": "/vol/loras/extra/adapter"},
                headers={"Authorization": "Bearer t0ken"},
            )
        ).status_code
    incoming = [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}]
    sent: list[str] = []

    async def receive() -> dict[str, Any]:
        return incoming.pop(0)

    async def send(message: dict[str, Any]) -> None:
        sent.append(message["type"])

    await container_app({"type": "lifespan"}, receive, send)
    ok = sent == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
    return {
        "ready": ready,
        "infer_without_token": infer,
        "lifespan": "ok" if ok else sent,
        "load_adapter": adapter,
    }


def test_a_monolithic_mapping_is_refused_not_deployed_as_separate_apps(tmp_path: Path) -> None:
    def edit(doc: dict) -> None:
        doc["monolithic"] = True

    with pytest.raises(ConfigError, match="monolithic"):
        build_specs(_edited(tmp_path, edit))


def _on_vllm(doc: dict[str, Any]) -> None:
    doc["workers"][1]["engine"] = "vllm"  # merged-claim
    doc["workers"][2]["engine"] = "vllm"  # dynamic-0, whose LoRAs vLLM loads at start: no discover
    del doc["workers"][2]["discover"]


def test_vllm_workers_get_vllm_apps_that_the_coordinator_reaches_like_hf_ones(tmp_path: Path) -> None:
    mapping = _edited(tmp_path, _on_vllm)
    specs = build_specs(mapping, workspace="acme")
    hf_specs = build_specs(load_for_modal(str(MAPPING), environ={}), workspace="acme")
    assert [(s.worker_id, s.engine, s.module) for s in specs] == [
        ("merged-calendar", "hf", "modal_deploy.app"),
        ("merged-claim", "vllm", "modal_deploy.vllm_app"),
        ("dynamic-0", "vllm", "modal_deploy.vllm_app"),
        (None, "hf", "modal_deploy.app"),
    ]
    for spec, hf in zip(specs[:-1], hf_specs[:-1], strict=True):
        # the same app but for what serves it: name, URL, GPU, volumes, secret, auth, scaling
        assert spec.model_dump(exclude={"engine", "mapping_path"}) == hf.model_dump(
            exclude={"engine", "mapping_path"}
        )
        assert spec.required_secret_keys == ["MOLE_WORKER_TOKEN"] and spec.requires_proxy_auth is False
    seen = load_for_modal(str(mapping.source_path), environ=specs[-1].env)
    assert seen.worker("dynamic-0").url == "https://acme--mole-dynamic-0.modal.run"
    assert seen.worker("dynamic-0").engine == "vllm"  # so the coordinator calls it as a vLLM server
    urls = {w.id: f"https://real--{w.id}.modal.run" for w in mapping.workers}
    coordinator = build_specs(mapping, worker_urls=urls)[-1]
    assert coordinator.env["MOLE_WORKER_MERGED_CLAIM_URL"] == urls["merged-claim"]
    assert coordinator.gpu == "H100"  # it runs the router


def test_a_coordinator_whose_router_is_on_vllm_gets_no_gpu(tmp_path: Path) -> None:
    def router_on_vllm(doc: dict[str, Any]) -> None:
        _on_vllm(doc)
        doc["router"]["served_by"] = "dynamic-0"

    specs = build_specs(_edited(tmp_path, router_on_vllm), workspace="acme")
    assert specs[-1].role == "coordinator" and specs[-1].gpu is None
    assert all(s.gpu == "H100" for s in specs[:-1])


def test_dry_run_shows_each_workers_engine(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _edited(tmp_path, _on_vllm).source_path
    assert main(["modal-deploy", "--config", str(path), "--dry-run", "--workspace", "acme"]) == 0
    rows = {
        line.split()[0]: line.split()[1]
        for line in capsys.readouterr().out.splitlines()
        if line.startswith("mole-")
    }
    assert rows == {
        "mole-merged-calendar": "hf",
        "mole-merged-claim": "vllm",
        "mole-dynamic-0": "vllm",
        "mole-coordinator": "-",
    }


def test_vllm_modal_module_imports_offline(tmp_path: Path) -> None:
    """modal_deploy/vllm_app.py as `modal deploy` loads it: one web server function named like the
    app, on the worker's GPU, volumes and secret, vLLM pinned as compose's image tag."""
    spec = build_specs(_edited(tmp_path, _on_vllm), coordinator=False)[2]
    code = (
        "import json, modal_deploy.vllm_app as m, modal; "
        "f = m.serve; s = f._spec_; "  # modal 1.6.4's function spec (private): what the decorators recorded
        "print(json.dumps({'app': m.app.name, 'web': list(m.app.registered_web_endpoints), "
        "'gpu': s.gpus, 'volumes': sorted(s.volumes), 'secrets': len(s.secrets), 'packages': m.vllm_image_packages()}))"
    )
    env = {"PATH": "/usr/bin:/bin", "HOME": "/nonexistent", SPEC_ENV: spec.model_dump_json()}  # no token
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    assert seen == {
        "app": "mole-dynamic-0",
        "web": ["serve"],
        "gpu": "H100",
        "volumes": sorted(VOLUMES),
        "secrets": 1,
        "packages": [f"vllm=={VLLM_VERSION}"],
    }
    assert VLLM_IMAGE.endswith(
        f":v{VLLM_VERSION}"
    )  # docker/docker-compose.vllm.yml's tag (tests/deploy/test_compose.py)


def test_vllm_container_starts_mole_ups_gpu_server_on_the_web_server_port(tmp_path: Path) -> None:
    """What the container's serve() runs, with --print: the mapping read where the volumes are,
    vLLM listening on every interface at the port @modal.web_server proxies."""
    path = production_on_vllm(tmp_path)
    spec = build_specs(load_for_modal(str(path), environ={}), coordinator=False)[2]
    command = vllm_command(spec, mapping_path=path)
    assert command[:3] == [sys.executable, "-m", "mole.vllm_serve"]
    env = {**os.environ, **vllm_env(tmp_path)}
    result = subprocess.run(
        [*command, "--print"], env=env, cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    served = shlex.split(result.stdout)
    assert served == server_command(load_mapping(path, env=env), "dynamic-0", port=VLLM_PORT)
    assert served[served.index("--host") + 1 : served.index("--host") + 4] == [
        "0.0.0.0",
        "--port",
        str(VLLM_PORT),
    ]
    with pytest.raises(ValueError, match="not a vLLM worker"):
        vllm_command(spec.model_copy(update={"engine": "hf"}))
