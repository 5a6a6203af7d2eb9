"""A streamed answer whose worker breaks after the first token: the client gets an error event and
``[DONE]`` (never a cut connection), the failure is counted in the statistics and against the
worker, like a failed unstreamed call."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
from support import ThreadServer, demo_mapping_copy, free_port, wait_for

from coordinator.app import create_app
from shared.schemas import AdapterInfo, WorkerReady
from shared.settings import Settings


def _breaking_worker(worker_id: str, adapters: list[str]) -> Any:
    """A worker (fault injection only) that reports ready, sends one piece of text on
    ``/infer/stream`` and then an unreadable line."""
    from fastapi import FastAPI
    from fastapi.responses import StreamingResponse

    app = FastAPI()

    @app.get("/health/ready")
    async def ready() -> dict[str, Any]:
        held = [AdapterInfo(name=a, sha256="0" * 64) for a in adapters]
        return WorkerReady(status="ready", worker_id=worker_id, mode="dynamic", adapters=held).model_dump()

    @app.post("/infer/stream")
    async def stream() -> StreamingResponse:
        async def lines() -> Any:
            yield json.dumps({"delta": "login"}).encode() + b"\n"
            yield b'{"delta": "half a li\n'

        return StreamingResponse(lines(), media_type="application/x-ndjson")

    return app


def test_a_worker_breaking_midway_is_an_error_event_and_counts_against_it(
    demo_assets: Path, tmp_path: Path
) -> None:
    mapping = demo_mapping_copy(demo_assets, tmp_path)
    doc = json.loads(mapping.read_text())
    dynamic = next(w for w in doc["workers"] if w["id"] == "dynamic-0")
    port = free_port()
    dynamic["url"] = f"http://127.0.0.1:{port}"
    mapping.write_text(json.dumps(doc))
    worker = ThreadServer(_breaking_worker("dynamic-0", dynamic["adapters"]), port)
    coordinator = ThreadServer(create_app(Settings(torch_threads=1), mapping), free_port())
    try:
        worker.wait_started()
        coordinator.wait_started()
        url = coordinator.url
        wait_for(
            lambda: any(
                w["id"] == "dynamic-0" and w["state"] == "up"
                for w in httpx.get(f"{url}/workers").json()["workers"]
            ),
            "the breaking worker probed up",
        )
        body = {
            "model": "login",
            "stream": True,
            "messages": [{"role": "user", "content": "what is the login button's colour?"}],
        }
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=30) as r:
            assert r.status_code == 200
            events = [line.removeprefix("data: ") for line in r.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]", events
        error = json.loads(events[-2])["error"]
        assert error["code"] == "worker_error" and "dynamic-0" in error["message"], error
        assert any(
            json.loads(e).get("choices", [{}])[0].get("delta", {}).get("content") == "login"
            for e in events[:-2]
        )
        row = next(w for w in httpx.get(f"{url}/workers").json()["workers"] if w["id"] == "dynamic-0")
        assert row["consecutive_failures"] == 1 and row["last_error"] == "bad_response", row
        assert httpx.get(f"{url}/classify/stats").json()["errors"] == {"worker_error": 1}
    finally:
        coordinator.stop()
        worker.stop()
