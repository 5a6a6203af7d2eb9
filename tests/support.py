"""Test helpers: free loopback ports, demo-mapping copies, real service processes (started with
:class:`mole.supervisor.ServiceProcess`, polled until ready), in-thread servers, fault injectors."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from mole.demo_assets import free_port as free_port  # re-exported for the tests
from mole.demo_assets import relocated_mapping
from mole.supervisor import ServiceProcess

REPO = Path(__file__).resolve().parent.parent


def demo_mapping_copy(assets: Path, out_dir: Path, *, name: str = "mapping.json", **top: Any) -> Path:
    """Copy the demo mapping to ``out_dir`` with absolute paths and fresh loopback ports.

    Keyword arguments replace top-level keys (e.g. ``dispatch={...}``) after the rewrite.
    """
    return relocated_mapping(assets, out_dir / name, **top)


def start_service(
    name: str, args: Sequence[str], url: str, log_dir: Path, env: dict[str, str] | None = None
) -> ServiceProcess:
    """A real ``mole ...`` service process, spawned (not yet ready) with one torch thread and its
    output in ``log_dir/<name>.log``; ``.wait_ready()``, ``.stop()`` and ``.kill()`` it."""
    role = "coordinator" if args[0] == "coordinator" else "worker"
    svc = ServiceProcess(name=name, role=role, url=url, args=list(args), log_path=log_dir / f"{name}.log")
    svc.spawn(env={"MOLE_TORCH_THREADS": "1", **(env or {})}, cwd=REPO)
    return svc


def worker_process(
    mapping: Path, worker_id: str, log_dir: Path, env: dict[str, str] | None = None
) -> ServiceProcess:
    doc = json.loads(mapping.read_text())
    url = next(w["url"] for w in doc["workers"] if w["id"] == worker_id)
    args = ["worker", "--config", str(mapping), "--worker-id", worker_id]
    return start_service(worker_id, args, url, log_dir, env)


def coordinator_process(
    mapping: Path, log_dir: Path, env: dict[str, str] | None = None, *, name: str = "coordinator"
) -> ServiceProcess:
    doc = json.loads(mapping.read_text())
    args = ["coordinator", "--config", str(mapping)]
    return start_service(name, args, doc["coordinator"]["url"], log_dir, env)


class ThreadServer:
    """A uvicorn server on a background thread (in-process coordinator, fake workers)."""

    def __init__(self, app: Any, port: int, settings: Any = None):
        import threading

        import uvicorn

        from shared.server import server_config
        from shared.settings import Settings

        self.url = f"http://127.0.0.1:{port}"
        # mole's own server configuration (guarded protocol), as ``mole coordinator`` runs it
        config = server_config(app, settings or Settings(), "127.0.0.1", port, timeout_graceful_shutdown=1)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()

    def wait_started(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError(f"server {self.url} exited during start-up")
            if time.monotonic() > deadline:
                raise TimeoutError(f"server {self.url} did not start")
            time.sleep(0.1)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(15)


def misbehaving_worker(worker_id: str, adapter: str, behaviour: str = "hang", mode: str = "dynamic") -> Any:
    """A worker that reports ready for ``adapter`` and then misbehaves on ``/infer`` (fault injection
    only): ``hang`` (never answers), ``500`` (an error answer), ``garbage`` (200 with malformed JSON)."""
    import asyncio

    from fastapi import FastAPI
    from fastapi.responses import JSONResponse, Response

    from shared.schemas import AdapterInfo, WorkerReady

    app = FastAPI()

    @app.get("/health/ready")
    async def ready() -> dict[str, Any]:
        info = AdapterInfo(name=adapter, sha256="0" * 64)
        return WorkerReady(status="ready", worker_id=worker_id, mode=mode, adapters=[info]).model_dump()

    @app.post("/infer")
    async def infer() -> Response:
        if behaviour == "hang":
            await asyncio.sleep(3600)
        if behaviour == "500":
            return JSONResponse(
                {"error": {"code": "generation_failed", "message": "CUDA error"}}, status_code=500
            )
        return Response(b'{"output": "half a resp', media_type="application/json")

    return app


def wait_for(predicate: Any, what: str, timeout: float = 30.0) -> None:
    """Poll ``predicate()`` every 0.1 s until it is true; ``AssertionError`` naming ``what`` after
    ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


VLLM_WORKERS = ("merged-claim", "dynamic-0")  # the production mapping's workers put on vLLM


def production_on_vllm(root: Path, *, ranks: dict[str, int] | None = None) -> Path:
    """The production mapping with ``merged-claim`` and ``dynamic-0`` on vLLM (``dynamic-0`` without its
    discover folder, which vLLM refuses), written to ``root`` next to the files vLLM's arguments are
    read from, laid out as the volumes are: ``models/`` (the base's image settings) and ``vol/``
    (each adapter's ``adapter_config.json``, the merged checkpoints). Load it with
    ``MOLE_MODEL_ROOT=root/models`` and ``MOLE_VOLUME=root/vol``."""
    doc = json.loads((REPO / "config" / "expert_machine_mapping.json").read_text())
    for w in doc["workers"]:
        if w["id"] in VLLM_WORKERS:
            w["engine"] = "vllm"
            w.pop("discover", None)
    image = {"size": {"shortest_edge": 65536, "longest_edge": 16777216}}  # Qwen3-VL-8B's preprocessor
    for folder in ("models/Qwen3-VL-8B-Instruct", "vol/merged/calendar", "vol/merged/claim"):
        (root / folder).mkdir(parents=True)
        (root / folder / "preprocessor_config.json").write_text(json.dumps(image))
    for name in doc["adapters"]:
        adapter = root / "vol" / "loras" / name / "adapter"
        adapter.mkdir(parents=True)
        config = {"r": (ranks or {}).get(name, 16), "target_modules": ["q_proj", "v_proj"]}
        (adapter / "adapter_config.json").write_text(json.dumps(config))
    path = root / "mapping.json"
    path.write_text(json.dumps(doc, indent=2))
    return path


def vllm_env(root: Path) -> dict[str, str]:
    """The ``${VAR}`` values that put :func:`production_on_vllm`'s paths under ``root``."""
    return {"MOLE_MODEL_ROOT": str(root / "models"), "MOLE_VOLUME": str(root / "vol")}


def vllm_python() -> str:
    """The python of vLLM's env (``MOLE_VLLM_PYTHON``, else ``.venv-vllm``). Without it the calling
    test is skipped, except under ``MOLE_REQUIRE_VLLM=1`` (``make test``), where it fails."""
    python = os.environ.get("MOLE_VLLM_PYTHON") or str(REPO / ".venv-vllm/bin/python")
    if not Path(python).exists():
        message = f"vLLM's env is not installed ({python}); run `make install-vllm`"
        if os.environ.get("MOLE_REQUIRE_VLLM") == "1":
            pytest.fail(message)
        pytest.skip(message)
    return python
