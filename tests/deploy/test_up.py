"""``mole up``: the real command on the demo mapping, as a user runs it: a worker SIGKILLed under it is
restarted while the others keep serving, then the whole stack is stopped with SIGTERM."""

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

from mole import synthetic
from mole.supervisor import RestartPolicy, Stack, StackError
from shared.images import encode_image_b64

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


def _classify_calendar(url: str) -> dict:
    sample = synthetic.make_samples(1, seed=7, kinds=("calendar",))[0]
    body = {"image_b64": encode_image_b64(sample.image), "prompt": sample.prompt, "expert": "calendar"}
    resp = httpx.post(f"{url}/classify", json=body, timeout=60)
    assert resp.status_code == 200, resp.text
    return resp.json()


def _services(log_dir: Path) -> dict[str, dict]:
    return {s["name"]: s for s in json.loads((log_dir / "stack.json").read_text())["services"]}


def test_restart_policy_backs_off_and_caps() -> None:
    policy = RestartPolicy(base_s=1.0, max_s=8.0)
    assert [policy.delay(n) for n in (1, 2, 3, 4, 5, 9)] == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]


def test_up_restarts_a_killed_worker_and_sigterm_stops_them_all(demo_assets: Path, tmp_path: Path) -> None:
    """Every service comes up; SIGKILL of a merged worker leaves the rest serving (its adapter
    answers from the dynamic worker, ``degraded``), the worker is restarted and used again; SIGTERM
    then stops everything, the restarted worker included."""
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

        coordinator = services["coordinator"]["url"]
        assert _classify_calendar(coordinator)["worker_id"] == "merged-calendar"
        victim = services["merged-calendar"]
        os.kill(victim["pid"], signal.SIGKILL)
        while _alive(victim["pid"]):
            time.sleep(0.05)
        answer = _classify_calendar(coordinator)  # while the worker is dead or loading again
        assert (answer["worker_id"], answer["degraded"]) == ("dynamic-0", True), answer
        deadline = time.monotonic() + READY_TIMEOUT_S
        while (now := _services(log_dir)["merged-calendar"])["state"] != "ready" or not now["restarts"]:
            assert up.poll() is None, f"mole up exited with {up.returncode}:\n{out.read_text()}"
            assert time.monotonic() < deadline, f"merged-calendar not restarted:\n{out.read_text()}"
            time.sleep(0.5)
        assert now["restarts"] == 1 and now["pid"] != victim["pid"] and now["last_exit"] == -signal.SIGKILL
        assert all(_alive(s["pid"]) for n, s in services.items() if n != "merged-calendar")  # untouched
        text = out.read_text()
        assert "merged-calendar exited with SIGKILL; restarting it in" in text, text
        assert "merged-calendar ready again (restart 1" in text, text
        assert _classify_calendar(coordinator)["worker_id"] == "merged-calendar"  # used again
        services["merged-calendar"] = now

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
