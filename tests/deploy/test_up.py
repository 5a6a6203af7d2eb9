"""``mole up``: the real command on the demo mapping, as a user runs it, then stopped with SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from support import REPO, demo_mapping_copy

from mole.supervisor import Stack, StackError

READY_TIMEOUT_S = 150  # four tiny models loading at once on two CPU cores


def _alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie, or a pid reused by something else, counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z" and b"mole.cli" in cmdline


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _mole_up(mapping: Path, log_dir: Path, out: Path) -> subprocess.Popen[bytes]:
    args = ["up", "--config", str(mapping), "--log-dir", str(log_dir), "--timeout", str(READY_TIMEOUT_S)]
    with out.open("wb") as fh:
        return subprocess.Popen(
            [sys.executable, "-m", "mole.cli", *args],
            stdout=fh,
            stderr=subprocess.STDOUT,
            env={**os.environ, "MOLE_TORCH_THREADS": "1"},
            cwd=REPO,
            start_new_session=True,
        )


def _wait_exit(proc: subprocess.Popen[bytes], timeout: float) -> int:
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise


def test_up_starts_every_service_and_sigterm_stops_them_all(demo_assets: Path, tmp_path: Path) -> None:
    mapping = demo_mapping_copy(demo_assets, tmp_path)
    log_dir, out = tmp_path / "logs", tmp_path / "up.out"
    up = _mole_up(mapping, log_dir, out)
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S + 30
        while "services ready" not in out.read_text(errors="replace"):
            assert up.poll() is None, f"mole up exited with {up.returncode}:\n{out.read_text()}"
            assert time.monotonic() < deadline, f"mole up never reported ready:\n{out.read_text()}"
            time.sleep(0.5)
        state = json.loads((log_dir / "stack.json").read_text())
        services = {s["name"]: s for s in state["services"]}
        doc = json.loads(mapping.read_text())
        assert set(services) == {w["id"] for w in doc["workers"]} | {"coordinator"}
        assert services["coordinator"]["url"] == doc["coordinator"]["url"]
        for s in services.values():
            assert s["state"] == "ready"
            assert httpx.get(f"{s['url']}/health/ready", timeout=5).status_code == 200, s["name"]
            assert Path(s["log"]).stat().st_size > 0
        text = out.read_text()
        assert all(name in text and s["url"] in text for name, s in services.items())  # the table

        up.send_signal(signal.SIGTERM)
        assert _wait_exit(up, 60) == 0, out.read_text()
    finally:
        if up.poll() is None:
            os.killpg(up.pid, signal.SIGKILL)
            up.wait()

    assert "stopped" in out.read_text()
    assert not [s["name"] for s in services.values() if _alive(s["pid"])]
    assert [s["name"] for s in services.values() if not _port_free(s["port"])] == []
    final = json.loads((log_dir / "stack.json").read_text())
    assert {s["state"] for s in final["services"]} == {"stopped"}


def test_up_reports_a_child_that_exits_during_startup_and_stops_the_rest(
    demo_assets: Path, tmp_path: Path
) -> None:
    # The coordinator checks every path at start-up and exits; `mole up` itself does not.
    mapping = demo_mapping_copy(demo_assets, tmp_path)
    doc = json.loads(mapping.read_text())
    doc["router"]["adapter"] = str(tmp_path / "missing-router")
    mapping.write_text(json.dumps(doc))
    log_dir, out = tmp_path / "logs", tmp_path / "up.out"
    up = _mole_up(mapping, log_dir, out)
    code = _wait_exit(up, READY_TIMEOUT_S)
    text = out.read_text()
    assert code == 1, text
    assert "coordinator exited" in text and "missing-router" in text  # with its log tail
    pids = [s["pid"] for s in json.loads((log_dir / "stack.json").read_text())["services"]]
    assert not [pid for pid in pids if _alive(pid)]


def test_stack_refuses_a_port_in_use_before_starting_anything(demo_assets: Path, tmp_path: Path) -> None:
    mapping = demo_mapping_copy(demo_assets, tmp_path)
    port = int(json.loads(mapping.read_text())["workers"][1]["url"].rsplit(":", 1)[1])
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", port))
        busy.listen()
        stack = Stack(mapping, run_dir=tmp_path / "logs")
        with pytest.raises(StackError, match=f"port {port} of merged-claim"):
            stack.start()
    assert all(s.proc is None for s in stack.services)


def test_up_reports_a_worker_that_failed_to_load_at_once(demo_assets: Path, tmp_path: Path) -> None:
    """A worker whose model folder holds no checkpoint (an empty mount) answers ``failed``:
    ``mole up`` says which and why and exits 1 without waiting out its ready timeout, leaving
    nothing running."""
    mapping = demo_mapping_copy(demo_assets, tmp_path)
    doc = json.loads(mapping.read_text())
    missing = tmp_path / "empty-mount"
    missing.mkdir()
    next(w for w in doc["workers"] if w["id"] == "dynamic-0")["model"] = str(missing)
    mapping.write_text(json.dumps(doc))
    log_dir, out = tmp_path / "logs", tmp_path / "up.out"
    t0 = time.monotonic()
    up = _mole_up(mapping, log_dir, out)
    assert _wait_exit(up, READY_TIMEOUT_S / 2) == 1
    text = out.read_text(errors="replace")
    assert "dynamic-0 failed to load" in text and str(missing) in text, text
    assert time.monotonic() - t0 < READY_TIMEOUT_S / 2
    ports = [int(w["url"].rsplit(":", 1)[1]) for w in doc["workers"]]
    assert all(_port_free(p) for p in ports)
