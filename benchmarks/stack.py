"""The real mole system as processes: ``mole worker`` for every demo worker and ``mole coordinator``,
on free loopback ports, from a copy of the demo mapping with absolute paths.

Start-up time (spawn to ``/health/ready``) and resident memory of each process are recorded for the
cost-growth scenario.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from benchmarks.core import rss_mb
from mole.demo_assets import relocated_mapping

READY_TIMEOUT_S = 180.0  # a loaded 2-core machine starting four torch processes at once is slow


def mapping_copy(assets: Path, out: Path) -> Path:
    """The demo mapping with absolute paths and fresh loopback ports, written to ``out``."""
    return relocated_mapping(assets, out)


@dataclass
class Process:
    """One ``mole`` service process with its log file."""

    name: str
    url: str
    args: list[str]
    log: Path
    env: dict[str, str]
    started: float = field(default_factory=time.perf_counter)
    ready_s: float | None = None  # spawn -> /health/ready answered 200
    proc: subprocess.Popen[bytes] | None = None

    def spawn(self) -> None:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("wb") as fh:
            self.started = time.perf_counter()
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "mole.cli", *self.args],
                stdout=fh,
                stderr=subprocess.STDOUT,
                env={**os.environ, **self.env},
                start_new_session=True,
            )

    def poll_ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.tail()}")
        try:
            ok = httpx.get(f"{self.url}/health/ready", timeout=2.0).status_code == 200
        except httpx.HTTPError:
            return False
        if ok and self.ready_s is None:
            self.ready_s = time.perf_counter() - self.started
        return ok

    def rss_mb(self) -> float | None:
        return rss_mb(self.proc.pid) if self.proc is not None else None

    def tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self, timeout: float = 30.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


class Stack:
    """Coordinator + every demo worker as real processes; ``close()`` stops them all."""

    def __init__(self, mapping_path: Path, processes: list[Process]):
        self.mapping_path = mapping_path
        self.processes = processes
        doc = json.loads(mapping_path.read_text())
        self.coordinator_url: str = doc["coordinator"]["url"]
        self.worker_urls: dict[str, str] = {w["id"]: w["url"] for w in doc["workers"]}
        self.worker_modes: dict[str, str] = {w["id"]: w["mode"] for w in doc["workers"]}
        self.started_s = 0.0  # first spawn -> every process ready and every worker probed up

    @classmethod
    def start(cls, assets: Path, work: Path, env: dict[str, str]) -> Stack:
        """Start every process at once and wait until the coordinator sees every worker up."""
        mapping = mapping_copy(assets, work / "stack" / "mapping.json")
        doc = json.loads(mapping.read_text())
        logs = work / "stack" / "logs"
        procs = [
            Process(
                w["id"],
                w["url"],
                ["worker", "--config", str(mapping), "--worker-id", w["id"]],
                logs / f"{w['id']}.log",
                env,
            )
            for w in doc["workers"]
        ]
        procs.append(
            Process(
                "coordinator",
                doc["coordinator"]["url"],
                ["coordinator", "--config", str(mapping)],
                logs / "coordinator.log",
                env,
            )
        )
        stack = cls(mapping, procs)
        t0 = time.perf_counter()
        for p in procs:
            p.spawn()
        try:
            stack._wait(t0 + READY_TIMEOUT_S)
        except BaseException:
            stack.close()
            raise
        stack.started_s = time.perf_counter() - t0
        return stack

    def _wait(self, deadline: float) -> None:
        pending = list(self.processes)
        while pending:
            if time.perf_counter() > deadline:
                names = ", ".join(p.name for p in pending)
                raise TimeoutError(f"not ready after {READY_TIMEOUT_S:.0f}s: {names}\n{pending[0].tail()}")
            pending = [p for p in pending if not p.poll_ready()]
            time.sleep(0.2)
        while time.perf_counter() < deadline:  # the coordinator's prober must have seen every worker
            rows = httpx.get(f"{self.coordinator_url}/workers", timeout=2.0).json()
            rows = rows.get("workers", rows) if isinstance(rows, dict) else rows
            if all(r.get("state") == "up" for r in rows):
                return
            time.sleep(0.2)
        raise TimeoutError("the coordinator did not see every worker up")

    def process(self, name: str) -> Process:
        return next(p for p in self.processes if p.name == name)

    def close(self) -> None:
        for p in reversed(self.processes):
            p.stop()
