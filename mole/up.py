"""``mole up``: run a mapping's coordinator and its local workers as child processes.

:class:`Stack` is the reusable part (``mole demo`` drives it too)::

    with Stack(mapping_path) as stack:          # start(): workers first, then the coordinator
        stack.wait_ready(timeout_s=180)         # raises StackError when a child exits or time runs out
        httpx.post(f"{stack.coordinator.probe_url}/classify", ...)
    # stop(): SIGTERM the coordinator, then the workers; SIGKILL what outlives the grace period

Each child runs ``python -m mole.cli worker|coordinator --config MAPPING`` in its own session
(process group) with stdout and stderr captured to ``RUN_DIR/<name>.log``; ``RUN_DIR/stack.json``
records pids, URLs and logs. Only workers whose URL is loopback are started; the others are left to
their own machines. With a monolithic mapping the coordinator serves one dynamic worker in its own
process (:mod:`mole.monolithic`), so that worker is not started. :func:`run` is the ``mole up``
command on top: progress, table, signals.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType, TracebackType
from typing import IO, Literal

from shared.errors import ConfigError
from shared.mapping import MoleMapping, load_mapping
from shared.table import format_table

READY_PATH = "/health/ready"  # 200 once the service has loaded its model
DEFAULT_READY_TIMEOUT_S = 180.0  # wait_ready's default budget for every service together
DEFAULT_STOP_GRACE_S = 45.0  # SIGTERM -> SIGKILL; > 2 x the services' default drain timeout (20 s)
POLL_INTERVAL_S = 0.25  # readiness probe and child liveness period
LOG_TAIL_LINES = 30  # log lines shown when a child fails
_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_WILDCARD_HOSTS = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}  # listen-all -> probe address
_PR_SET_PDEATHSIG = 1  # linux/prctl.h

Role = Literal["worker", "coordinator"]
State = Literal["pending", "starting", "loading", "ready", "exited", "stopped"]


class StackError(Exception):
    """``mole up`` could not bring the stack up; the message says which service and why."""


class ServiceExited(StackError):
    """A child exited while the stack was starting or running."""

    def __init__(self, service: ServiceProcess):
        self.service = service
        self.returncode = service.returncode
        super().__init__(
            f"{service.name} exited with code {service.returncode} "
            f"(log: {service.log_path}); last lines:\n{service.log_tail()}"
        )


class ReadyTimeout(StackError):
    """Some services were not ready within the timeout."""


@dataclass
class ServiceProcess:
    """One child: what it runs, where it listens, its log, and what the last probe saw."""

    name: str  # worker id, or "coordinator"
    role: Role
    url: str  # URL from the mapping
    probe_url: str  # where this machine reaches it (loopback for a 0.0.0.0 listener)
    host: str  # listen address
    port: int  # listen port
    args: list[str]  # mole.cli arguments
    log_path: Path
    state: State = "pending"
    proc: subprocess.Popen[bytes] | None = None
    started_at: float | None = None  # time.monotonic() at spawn
    ready_after_s: float | None = None  # seconds from spawn to the first 200 on READY_PATH
    _log: IO[bytes] | None = field(default=None, repr=False)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def returncode(self) -> int | None:
        return self.proc.poll() if self.proc is not None else None

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        """The last ``lines`` lines of the child's log (empty when unreadable)."""
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(f"  | {line}" for line in text.splitlines()[-lines:])


ProgressFn = Callable[["Stack", float], None]


class Stack:
    """The coordinator plus every local worker of a mapping, as child processes.

    Contract: :meth:`start` spawns workers (mapping order) and then the coordinator after checking
    that every port is free; :meth:`wait_ready` returns when every ``/health/ready`` answers 200 and
    raises :class:`ServiceExited` / :class:`ReadyTimeout` otherwise; :meth:`stop` is idempotent and
    returns only when every child and everything in its process group is gone. Used as a context
    manager, the stack is stopped on exit whatever happened.
    """

    def __init__(
        self,
        mapping_path: str | Path,
        *,
        run_dir: str | Path | None = None,
        env: Mapping[str, str] | None = None,
        python: str = sys.executable,
        stop_grace_s: float = DEFAULT_STOP_GRACE_S,
    ):
        self.mapping_path = Path(mapping_path).resolve()
        self.mapping: MoleMapping = load_mapping(self.mapping_path)
        self.run_dir = Path(run_dir) if run_dir is not None else Path(tempfile.mkdtemp(prefix="mole-up-"))
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.python = python
        self.stop_grace_s = stop_grace_s
        self.started_at: float | None = None
        self._hurry = False
        config = ["--config", str(self.mapping_path)]
        # A monolithic coordinator serves one dynamic worker in its own process: not started here.
        self.inprocess_worker = _inprocess_worker_id(self.mapping)
        own = [w for w in self.mapping.workers if w.id != self.inprocess_worker]
        self.workers = [
            self._service(w.id, "worker", w.url, w.host, w.port, ["worker", *config, "--worker-id", w.id])
            for w in own
            if w.is_local()
        ]
        coord = self.mapping.coordinator
        self.coordinator = self._service(
            "coordinator", "coordinator", coord.url, coord.host, coord.port, ["coordinator", *config]
        )
        self.remote_workers = [w for w in own if not w.is_local()]

    def _service(
        self, name: str, role: Role, url: str, host: str, port: int, args: list[str]
    ) -> ServiceProcess:
        probe_host = _WILDCARD_HOSTS.get(host, host)
        probe_host = f"[{probe_host}]" if ":" in probe_host else probe_host
        return ServiceProcess(
            name=name,
            role=role,
            url=url,
            probe_url=f"http://{probe_host}:{port}",
            host=host,
            port=port,
            args=args,
            log_path=self.run_dir / f"{name}.log",
        )

    @property
    def services(self) -> list[ServiceProcess]:
        """Workers first, then the coordinator: the start order."""
        return [*self.workers, self.coordinator]

    # ---- lifecycle -----------------------------------------------------------------------------
    def start(self) -> None:
        """Check ports, then spawn the workers and the coordinator (without waiting for readiness).

        Raises ``StackError`` naming the service whose port is taken; nothing is started then.
        """
        self._check_ports()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.started_at = time.monotonic()
        try:
            for service in self.services:
                self._spawn(service)
        except BaseException:
            self.stop()
            raise
        self.write_state()

    def wait_ready(
        self, timeout_s: float = DEFAULT_READY_TIMEOUT_S, progress: ProgressFn | None = None
    ) -> None:
        """Poll every service's ``/health/ready`` until all answer 200.

        ``progress(stack, elapsed_s)`` is called after every polling round. Raises
        :class:`ServiceExited` as soon as a child exits and :class:`ReadyTimeout` after ``timeout_s``.
        """
        begin = time.monotonic()
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: no proxies
        while True:
            for service in self.services:
                if service.state == "ready":
                    continue
                if not service.running():
                    service.state = "exited"
                    raise ServiceExited(service)
                service.state = _probe(opener, service.probe_url)
                if service.state == "ready" and service.started_at is not None:
                    service.ready_after_s = time.monotonic() - service.started_at
            elapsed = time.monotonic() - begin
            if progress is not None:
                progress(self, elapsed)
            if all(s.state == "ready" for s in self.services):
                self.write_state()
                return
            if elapsed > timeout_s:
                waiting = ", ".join(f"{s.name} ({s.state})" for s in self.services if s.state != "ready")
                logs = "\n".join(f"{s.name}: {s.log_path}\n{s.log_tail(10)}" for s in self.services)
                raise ReadyTimeout(f"not ready after {timeout_s:.0f}s: {waiting}\n{logs}")
            time.sleep(POLL_INTERVAL_S)

    def check_alive(self) -> None:
        """Raise :class:`ServiceExited` for the first child that is no longer running."""
        for service in self.services:
            if service.proc is not None and not service.running():
                service.state = "exited"
                raise ServiceExited(service)

    def hurry(self) -> None:
        """Make a running or later :meth:`stop` skip the grace period (a second Ctrl-C)."""
        self._hurry = True

    def stop(self) -> None:
        """SIGTERM the coordinator and wait (it drains in-flight requests that need the workers),
        then SIGTERM the workers together; SIGKILL whatever outlives ``stop_grace_s``. Idempotent."""
        self._terminate([self.coordinator])
        self._terminate(self.workers)
        for service in self.services:
            if service._log is not None:
                service._log.close()
                service._log = None
        if self.started_at is not None:
            self.write_state()

    def __enter__(self) -> Stack:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # ---- reporting -----------------------------------------------------------------------------
    def table(self) -> str:
        """Aligned table of every service: name, role, state, pid, URL, log."""
        rows: list[tuple[str, ...]] = []
        for s in self.services:
            rows.append((s.name, s.role, s.state, str(s.pid or "-"), s.probe_url, str(s.log_path)))
        for w in self.remote_workers:
            rows.append((w.id, "worker", "remote", "-", w.url, "(not started here)"))
        if self.inprocess_worker is not None:  # monolithic: served inside the coordinator
            co = self.coordinator
            rows.append(
                (
                    self.inprocess_worker,
                    "worker",
                    "in-process",
                    str(co.pid or "-"),
                    co.probe_url,
                    str(co.log_path),
                )
            )
        return format_table(("SERVICE", "ROLE", "STATE", "PID", "URL", "LOG"), rows)

    def write_state(self) -> None:
        """Write ``RUN_DIR/stack.json``: mapping, and per service its pid, URL, state and log."""
        doc = {
            "mapping": str(self.mapping_path),
            "services": [
                {
                    "name": s.name,
                    "role": s.role,
                    "pid": s.pid,
                    "url": s.probe_url,
                    "port": s.port,
                    "state": s.state,
                    "log": str(s.log_path),
                    "returncode": s.returncode,
                }
                for s in self.services
            ],
        }
        path = self.run_dir / "stack.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(doc, indent=2) + "\n")
        tmp.replace(path)

    # ---- internals -----------------------------------------------------------------------------
    def _check_ports(self) -> None:
        seen: dict[int, str] = {}
        for s in self.services:
            if s.port in seen:
                raise StackError(f"{s.name} and {seen[s.port]} both want port {s.port}; fix the mapping")
            seen[s.port] = s.name
            if not _port_free(s.host, s.port):
                raise StackError(
                    f"port {s.port} of {s.name} ({s.url}) is already in use; "
                    "stop whatever holds it or change the URL in the mapping"
                )

    def _spawn(self, service: ServiceProcess) -> None:
        service._log = service.log_path.open("wb")
        # Block the stop signals while spawning so a Ctrl-C cannot land between fork and bookkeeping
        # (the child unblocks them in _child_setup before exec).
        old = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
        try:
            service.proc = subprocess.Popen(
                [self.python, "-m", "mole.cli", *service.args],
                stdin=subprocess.DEVNULL,
                stdout=service._log,
                stderr=subprocess.STDOUT,
                env=self.env,
                start_new_session=True,  # own process group: the terminal's Ctrl-C reaches only us
                preexec_fn=_child_setup,  # safe: mole up starts no threads of its own
            )
            service.started_at = time.monotonic()
            service.state = "starting"
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)

    def _terminate(self, services: list[ServiceProcess]) -> None:
        live = [s for s in services if s.running()]
        for s in live:
            _signal_group(s, signal.SIGTERM)
        deadline = time.monotonic() + self.stop_grace_s
        for s in live:
            assert s.proc is not None
            while s.proc.poll() is None and time.monotonic() < deadline and not self._hurry:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    s.proc.wait(timeout=0.1)
            if s.proc.poll() is None:
                _signal_group(s, signal.SIGKILL)
                s.proc.wait()
        for s in services:
            if s.proc is not None:
                _signal_group(s, signal.SIGKILL)  # leftovers of the group (the leader is reaped)
                if s.state not in ("exited",):
                    s.state = "stopped"


def _inprocess_worker_id(mapping: MoleMapping) -> str | None:
    """The worker a monolithic mapping's coordinator serves in-process (None when not monolithic)."""
    if not mapping.monolithic:
        return None
    from mole.monolithic import inprocess_worker

    return inprocess_worker(mapping).id


def _child_setup() -> None:
    """Runs in the child between fork and exec: unblock the stop signals and, on Linux, ask for
    SIGTERM when ``mole up`` dies without cleaning up (e.g. SIGKILL), so no child outlives it."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM))


def _signal_group(service: ServiceProcess, sig: int) -> None:
    if service.pid is None:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(service.pid, sig)  # start_new_session: the child's pid is its group id


def _probe(opener: urllib.request.OpenerDirector, base_url: str) -> State:
    try:
        with opener.open(base_url + READY_PATH, timeout=1.0) as resp:
            return "ready" if resp.status == 200 else "loading"
    except urllib.error.HTTPError:
        return "loading"  # listening, answering 503 until the model is loaded
    except (OSError, ValueError):
        return "starting"  # not listening yet (URLError, refused, timeout)


def _port_free(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


# ---- the `mole up` command -------------------------------------------------------------------------
class Progress:
    """Prints start-up progress: one rewritten line on a terminal; on a pipe, a line per change and
    a reminder every ``every_s`` seconds."""

    def __init__(self, out: IO[str] | None = None, every_s: float = 10.0):
        self.out: IO[str] = out if out is not None else sys.stderr
        self.tty = self.out.isatty()
        self.every_s = every_s
        self._last: dict[str, str] = {}
        self._last_line_at = 0.0

    def __call__(self, stack: Stack, elapsed: float) -> None:
        ready = sum(s.state == "ready" for s in stack.services)
        summary = ", ".join(f"{s.name} {s.state}" for s in stack.services)
        if self.tty:
            line = f"[{elapsed:5.1f}s] {ready}/{len(stack.services)} ready: {summary}"
            self.out.write("\r\033[K" + line)
            if ready == len(stack.services):
                self.out.write("\n")
            self.out.flush()
            return
        for s in stack.services:
            if self._last.get(s.name) != s.state:
                self._last[s.name] = s.state
                if s.state == "ready":
                    self.out.write(f"[{elapsed:5.1f}s] {s.name} ready\n")
                    self._last_line_at = elapsed
        if elapsed - self._last_line_at >= self.every_s:
            waiting = ", ".join(f"{s.name} ({s.state})" for s in stack.services if s.state != "ready")
            self.out.write(f"[{elapsed:5.1f}s] waiting for {waiting}\n")
            self._last_line_at = elapsed
        self.out.flush()


class _StopRequested(Exception):
    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)


@contextlib.contextmanager
def _stop_signals(stack: Stack) -> Iterator[Callable[[], None]]:
    """While active, the first SIGINT/SIGTERM raises :class:`_StopRequested`; later ones, and any
    after the yielded ``mark_stopping()`` was called, make the stop skip its grace period."""
    stopping = False

    def handler(signum: int, frame: FrameType | None) -> None:
        if stopping:
            stack.hurry()
            return
        mark_stopping()
        raise _StopRequested(signum)

    def mark_stopping() -> None:
        nonlocal stopping
        stopping = True

    previous = {sig: signal.signal(sig, handler) for sig in _STOP_SIGNALS}
    try:
        yield mark_stopping
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def run(args: argparse.Namespace) -> int:
    """``mole up``: start, show progress, print the table, wait for Ctrl-C/SIGTERM, stop.

    Exit codes: 0 after a requested stop, 1 when a service failed or was not ready in time,
    2 for a bad mapping or a port already in use.
    """
    from shared.settings import Settings

    # A child may use its drain timeout twice: uvicorn waits for in-flight requests, then the app's
    # shutdown drains its batcher.
    grace = 2 * Settings().drain_timeout_s + 5.0
    try:
        stack = Stack(args.config, run_dir=args.log_dir, stop_grace_s=grace)
    except ConfigError as exc:
        print(f"mole up: {exc}", file=sys.stderr)
        return 2
    names = ", ".join(s.name for s in stack.services)
    print(f"mole up: starting {names}; logs in {stack.run_dir}", file=sys.stderr, flush=True)
    code = 0
    with _stop_signals(stack) as mark_stopping:
        try:
            try:
                stack.start()
            except StackError as exc:
                print(f"mole up: {exc}", file=sys.stderr)
                return 2
            stack.wait_ready(args.timeout, Progress(sys.stderr))
            print(f"\n{stack.table()}\n", flush=True)
            print(
                f"mole up: all {len(stack.services)} services ready in "
                f"{time.monotonic() - (stack.started_at or 0):.1f}s; "
                f"coordinator at {stack.coordinator.probe_url}; Ctrl-C to stop",
                flush=True,
            )
            while True:
                stack.check_alive()
                time.sleep(0.5)
        except _StopRequested as req:
            print(f"\nmole up: {req} received, stopping (again to kill)", file=sys.stderr, flush=True)
        except StackError as exc:
            print(f"\nmole up: {exc}", file=sys.stderr, flush=True)
            code = 1
        finally:
            mark_stopping()
            stack.stop()
    print(f"mole up: stopped; logs kept in {stack.run_dir}", file=sys.stderr, flush=True)
    return code
