"""Test helpers: free loopback ports, demo-mapping copies, real service processes polled until ready."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

from mole.demo_assets import free_port as free_port  # re-exported for the tests
from mole.demo_assets import relocated_mapping

REPO = Path(__file__).resolve().parent.parent
_PATH_KEYS = ("lora", "merged", "model", "discover", "adapter")


def demo_mapping_copy(assets: Path, out_dir: Path, *, name: str = "mapping.json", **top: Any) -> Path:
    """Copy the demo mapping to ``out_dir`` with absolute paths and fresh loopback ports.

    Keyword arguments replace top-level keys (e.g. ``routing={...}``) after the rewrite.
    """
    return relocated_mapping(assets, out_dir / name, **top)


class Service:
    """A real service process (``mole ...``) with its log file; stopped with SIGTERM."""

    def __init__(self, args: Sequence[str], url: str, log: Path, env: dict[str, str] | None = None):
        self.args = list(args)
        self.url = url
        self.log = log
        full_env = {**os.environ, "MOLE_TORCH_THREADS": "1", **(env or {})}
        self._fh = log.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mole.cli", *self.args],
            stdout=self._fh,
            stderr=subprocess.STDOUT,
            env=full_env,
            cwd=REPO,
            start_new_session=True,
        )

    def wait_ready(self, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.args} exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/health/ready", timeout=1.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"{self.args} not ready after {timeout}s:\n{self.log_tail()}")

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._fh.close()
        return self.proc.returncode

    def kill(self) -> None:
        self.stop(signal.SIGKILL)


def worker_process(
    mapping: Path, worker_id: str, log_dir: Path, env: dict[str, str] | None = None
) -> Service:
    doc = json.loads(mapping.read_text())
    url = next(w["url"] for w in doc["workers"] if w["id"] == worker_id)
    return Service(
        ["worker", "--config", str(mapping), "--worker-id", worker_id], url, log_dir / f"{worker_id}.log", env
    )


def coordinator_process(mapping: Path, log_dir: Path, env: dict[str, str] | None = None) -> Service:
    doc = json.loads(mapping.read_text())
    return Service(
        ["coordinator", "--config", str(mapping)], doc["coordinator"]["url"], log_dir / "coordinator.log", env
    )


class ThreadServer:
    """A uvicorn server on a background thread (in-process coordinator, fake workers)."""

    def __init__(self, app: Any, port: int):
        import threading

        import uvicorn

        self.url = f"http://127.0.0.1:{port}"
        config = uvicorn.Config(
            app, host="127.0.0.1", port=port, log_config=None, access_log=False, timeout_graceful_shutdown=1
        )
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
