"""The process supervisor: mole services as child processes, polled until ready, stopped cleanly.

:class:`ServiceProcess` is one child, ``python -m mole.cli worker|coordinator ...``, in its own
session (process group) with stdout and stderr captured to a log file; the tests start single
services with it. :class:`Stack` is a mapping's coordinator and its local workers (``mole up``,
``mole demo`` and the benchmarks' process stack drive it)::

    with Stack(mapping_path) as stack:          # start(): workers first, then the coordinator
        stack.wait_ready(timeout_s=180)         # raises StackError when a child exits or time runs out
        httpx.post(f"{stack.coordinator.probe_url}/classify", ...)
    # stop(): SIGTERM the coordinator, then the workers; SIGKILL what outlives the grace period

``RUN_DIR/<name>.log`` holds each child's output and ``RUN_DIR/stack.json`` records pids, URLs,
states, restarts and logs. ``mole up`` keeps the stack serving when one child dies: it calls
:meth:`Stack.supervise` every half second, which restarts a crashed service after a backoff
(:class:`RestartPolicy`) and leaves the others running, so the coordinator's dynamic fallback
serves a dead merged worker's adapter until the worker is back. Only workers whose URL is loopback are started; the others are left to their own machines.
With a monolithic mapping the coordinator serves one dynamic worker in its own process
(:mod:`mole.monolithic`), so that worker is not started.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Literal
from urllib.parse import urlsplit

from mole.vllm_worker import READY_PATH as VLLM_READY_PATH
from mole.vllm_worker import VllmLaunch
from shared.mapping import MoleMapping, WorkerSpec, load_mapping
from shared.settings import Settings
from shared.table import format_table

READY_PATH = "/health/ready"  # 200 once the service has loaded its model
DEFAULT_READY_TIMEOUT_S = 180.0  # wait_ready's default budget for every service together
DEFAULT_STOP_GRACE_S = 45.0  # SIGTERM -> SIGKILL; > 2 x the services' default drain timeout (20 s)
POLL_INTERVAL_S = 0.25  # readiness probe and child liveness period
LOG_TAIL_LINES = 30  # log lines shown when a child fails
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_WILDCARD_HOSTS = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}  # listen-all -> probe address
_PR_SET_PDEATHSIG = 1  # linux/prctl.h

Role = Literal["worker", "coordinator"]
State = Literal["pending", "starting", "loading", "ready", "failed", "exited", "restarting", "stopped"]


@dataclass(frozen=True)
class RestartPolicy:
    """How :meth:`Stack.supervise` restarts a crashed service: after ``base_s``, doubling with each
    crash in a row up to ``max_s``; a service that ran ``reset_after_s`` since its last start
    counts its next crash as the first again."""

    base_s: float = 1.0  # delay before the first restart
    max_s: float = 30.0  # cap of the doubling delay (a service that cannot start is retried this often)
    reset_after_s: float = 60.0  # uptime after which a crash is a first crash again

    def delay(self, crashes_in_a_row: int) -> float:
        """Seconds to wait before restarting after the ``crashes_in_a_row``-th crash (1-based)."""
        return min(self.max_s, self.base_s * 2 ** max(0, crashes_in_a_row - 1))


class StackError(Exception):
    """A service could not be brought up; the message says which service and why."""


class ServiceExited(StackError):
    """A child exited while it was starting or running."""

    def __init__(self, service: ServiceProcess):
        self.service = service
        self.returncode = service.returncode
        super().__init__(
            f"{service.name} exited with code {service.returncode} "
            f"(log: {service.log_path}); last lines:\n{service.log_tail()}"
        )


class ServiceFailed(StackError):
    """A child is running but reports that it failed to load (``/health/ready`` status ``failed``)."""

    def __init__(self, service: ServiceProcess, error: str):
        self.service = service
        super().__init__(f"{service.name} failed to load: {error} (log: {service.log_path})")


class ReadyTimeout(StackError):
    """Some services were not ready within the timeout."""


@dataclass
class ServiceProcess:
    """One child: what it runs, where it listens, its log, and what the last probe saw.

    Contract: :meth:`spawn` starts it once; :meth:`wait_ready` returns when ``/health/ready``
    answers 200 and raises :class:`ServiceExited` / :class:`ReadyTimeout` otherwise; :meth:`stop`
    is idempotent and returns only when the child and everything in its process group is gone.
    """

    name: str  # worker id, or "coordinator"
    role: Role
    url: str  # URL from the mapping: where it listens
    args: list[str]  # mole.cli arguments
    log_path: Path
    state: State = "pending"
    proc: subprocess.Popen[bytes] | None = None
    started_at: float | None = None  # time.monotonic() at spawn
    ready_after_s: float | None = None  # seconds from spawn to the first 200 on READY_PATH
    restarts: int = 0  # times the supervisor restarted it
    crashes_in_a_row: int = 0  # crashes since it last ran RestartPolicy.reset_after_s
    restart_at: float | None = None  # time.monotonic() of a scheduled restart
    last_exit: int | None = None  # exit code of the last crash (negative: killed by that signal)
    command: list[str] | None = None  # the whole command instead of `python -m mole.cli ARGS` (vLLM)
    env: dict[str, str] = field(default_factory=dict)  # laid over the stack's environment
    ready_path: str = READY_PATH  # answers 200 once the service is ready
    _log: IO[bytes] | None = field(default=None, repr=False)

    @property
    def host(self) -> str:
        """Listen address (the URL's host)."""
        return urlsplit(self.url).hostname or ""

    @property
    def port(self) -> int:
        """Listen port (the URL's port, else the scheme's default)."""
        parts = urlsplit(self.url)
        return parts.port or (443 if parts.scheme == "https" else 80)

    @property
    def probe_url(self) -> str:
        """Where this machine reaches it (loopback for a 0.0.0.0 listener)."""
        host = _WILDCARD_HOSTS.get(self.host, self.host)
        return f"http://{f'[{host}]' if ':' in host else host}:{self.port}"

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

    # ---- lifecycle -----------------------------------------------------------------------------
    def spawn(
        self,
        *,
        python: str = sys.executable,
        env: Mapping[str, str] | None = None,
        cwd: str | Path | None = None,
        tie_to_parent: bool = False,
        append_log: bool = False,
    ) -> None:
        """Start ``python -m mole.cli ARGS`` (or :attr:`command`) in a new session, output to
        ``log_path`` (truncated, or appended to with ``append_log``, as a restart does).

        ``env`` is laid over this process's environment. ``tie_to_parent`` (for a command such as
        ``mole up`` that spawns from its main thread and runs no other threads: it uses a
        ``preexec_fn``) blocks SIGINT/SIGTERM during the fork so a Ctrl-C cannot land between fork
        and bookkeeping, and on Linux has the child receive SIGTERM when the spawning thread dies
        without cleaning up (e.g. SIGKILL), so no child outlives it.
        """
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("ab" if append_log else "wb")
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS) if tie_to_parent else None
        try:
            self.proc = subprocess.Popen(
                self.command or [python, "-m", "mole.cli", *self.args],
                stdin=subprocess.DEVNULL,
                stdout=self._log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {}), **self.env},
                cwd=cwd,
                start_new_session=True,  # own process group: the terminal's Ctrl-C reaches only us
                preexec_fn=_child_setup if tie_to_parent else None,
            )
            self.started_at = time.monotonic()
            self.state = "starting"
        except BaseException:
            self._close_log()
            raise
        finally:
            if old_mask is not None:
                signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)

    def poll_ready(self) -> bool:
        """Probe ``/health/ready`` once (not again once it answered 200); True when ready. Raises
        :class:`ServiceExited` when the child is not running."""
        if self.state == "ready":
            return True
        if not self.running():
            self.state = "exited"
            raise ServiceExited(self)
        self.state, error = _probe(self.probe_url + self.ready_path)
        if self.state == "failed":
            raise ServiceFailed(self, error or "no reason given")
        if self.state == "ready" and self.started_at is not None:
            self.ready_after_s = time.monotonic() - self.started_at
        return self.state == "ready"

    def wait_ready(self, timeout_s: float = DEFAULT_READY_TIMEOUT_S) -> None:
        """Poll until ready; :class:`ServiceExited` / :class:`ReadyTimeout` otherwise."""
        wait_ready([self], timeout_s)

    def stop(self, sig: int = signal.SIGTERM, grace_s: float = DEFAULT_STOP_GRACE_S) -> int | None:
        """Send ``sig`` to the child's process group and SIGKILL it after ``grace_s``; returns the
        exit code. Idempotent."""
        stop_together([self], grace_s, sig=sig)
        return self.returncode

    def kill(self) -> None:
        """SIGKILL the child's process group at once."""
        self.stop(signal.SIGKILL)

    def signal_group(self, sig: int) -> None:
        """Send ``sig`` to the child's process group (its pid is the group id)."""
        if self.pid is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, sig)

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None


def wait_ready(
    services: Sequence[ServiceProcess],
    timeout_s: float = DEFAULT_READY_TIMEOUT_S,
    progress: Callable[[float], None] | None = None,
) -> None:
    """Poll every service's ``/health/ready`` until all answer 200.

    ``progress(elapsed_s)`` is called after every polling round. Raises :class:`ServiceExited` as
    soon as a child exits and :class:`ReadyTimeout` after ``timeout_s``.
    """
    begin = time.monotonic()
    while True:
        pending = [s for s in services if not s.poll_ready()]
        elapsed = time.monotonic() - begin
        if progress is not None:
            progress(elapsed)
        if not pending:
            return
        if elapsed > timeout_s:
            waiting = ", ".join(f"{s.name} ({s.state})" for s in pending)
            logs = "\n".join(f"{s.name}: {s.log_path}\n{s.log_tail(10)}" for s in services)
            raise ReadyTimeout(f"not ready after {timeout_s:.0f}s: {waiting}\n{logs}")
        time.sleep(POLL_INTERVAL_S)


def stop_together(
    services: Sequence[ServiceProcess],
    grace_s: float = DEFAULT_STOP_GRACE_S,
    *,
    sig: int = signal.SIGTERM,
    hurried: Callable[[], bool] = lambda: False,
) -> None:
    """Send ``sig`` to every running service's process group at once, wait for them (until
    ``grace_s`` or ``hurried()``), SIGKILL the stragglers and whatever is left in each group, close
    the logs. Idempotent."""
    live = [s for s in services if s.running()]
    for s in live:
        s.signal_group(sig)
    deadline = time.monotonic() + grace_s
    for s in live:
        assert s.proc is not None
        while s.proc.poll() is None and time.monotonic() < deadline and not hurried():
            with contextlib.suppress(subprocess.TimeoutExpired):
                s.proc.wait(timeout=0.1)
        if s.proc.poll() is None:
            s.signal_group(signal.SIGKILL)
            s.proc.wait()
    for s in services:
        if s.proc is not None:
            s.signal_group(signal.SIGKILL)  # leftovers of the group (the leader is reaped)
            if s.state != "exited":
                s.state = "stopped"
        s._close_log()


ProgressFn = Callable[["Stack", float], None]


class Stack:
    """The coordinator plus every local worker of a mapping, as child processes.

    Contract: :meth:`start` spawns workers (mapping order) and then the coordinator after checking
    that every port is free; :meth:`wait_ready` returns when every ``/health/ready`` answers 200 and
    raises :class:`ServiceExited` / :class:`ReadyTimeout` otherwise; :meth:`stop` is idempotent and
    returns only when every child and everything in its process group is gone. Used as a context
    manager, the stack is stopped on exit whatever happened. ``tie_to_parent`` is
    :meth:`ServiceProcess.spawn`'s (leave it on for a command's main thread, off where threads run).
    """

    def __init__(
        self,
        mapping_path: str | Path,
        *,
        run_dir: str | Path | None = None,
        env: Mapping[str, str] | None = None,
        python: str = sys.executable,
        stop_grace_s: float = DEFAULT_STOP_GRACE_S,
        tie_to_parent: bool = True,
        restart_policy: RestartPolicy | None = None,
        vllm: VllmLaunch | None = None,
    ):
        self.mapping_path = Path(mapping_path).resolve()
        self.mapping: MoleMapping = load_mapping(self.mapping_path)
        self.run_dir = Path(run_dir) if run_dir is not None else Path(tempfile.mkdtemp(prefix="mole-up-"))
        self.env = dict(env or {})
        self.python = python
        self.stop_grace_s = stop_grace_s
        self.tie_to_parent = tie_to_parent
        self.restart_policy = restart_policy or RestartPolicy()
        self.started_at: float | None = None
        self._hurry = False
        config = ["--config", str(self.mapping_path)]
        # A monolithic coordinator serves one dynamic worker in its own process: not started here.
        self.inprocess_worker = _inprocess_worker_id(self.mapping)
        own = [w for w in self.mapping.workers if w.id != self.inprocess_worker]
        if vllm is None and any(w.engine == "vllm" for w in own):
            vllm = VllmLaunch.of(Settings())
        self.workers = [
            self._service(w.id, "worker", w.url, ["worker", *config, "--worker-id", w.id])
            if w.engine == "hf"
            else self._vllm_service(w, vllm)
            for w in own
            if w.is_local()
        ]
        coord = self.mapping.coordinator
        self.coordinator = self._service("coordinator", "coordinator", coord.url, ["coordinator", *config])
        self.remote_workers = [w for w in own if not w.is_local()]

    def _service(self, name: str, role: Role, url: str, args: list[str]) -> ServiceProcess:
        return ServiceProcess(name=name, role=role, url=url, args=args, log_path=self.run_dir / f"{name}.log")

    def _vllm_service(self, w: WorkerSpec, vllm: VllmLaunch | None) -> ServiceProcess:
        """A vLLM OpenAI server for ``w`` (see :mod:`mole.vllm_worker`); ``StackError`` when vLLM's
        python is missing or the adapters are ones vLLM cannot serve."""
        assert vllm is not None
        if not Path(vllm.python).exists():
            raise StackError(
                f"worker {w.id} runs on vLLM, but {vllm.python} does not exist: run `make install-vllm` "
                "or set MOLE_VLLM_PYTHON to the python of an environment with vLLM"
            )
        try:
            command = vllm.command(self.mapping, w)
        except ValueError as exc:
            raise StackError(f"worker {w.id}: {exc}") from None
        service = self._service(w.id, "worker", w.url, [])
        service.command, service.env, service.ready_path = command, vllm.env(w), VLLM_READY_PATH
        return service

    @property
    def services(self) -> list[ServiceProcess]:
        """Workers first, then the coordinator: the start order."""
        return [*self.workers, self.coordinator]

    def service(self, name: str) -> ServiceProcess:
        """The started service called ``name`` (a worker id or "coordinator"); KeyError otherwise."""
        for s in self.services:
            if s.name == name:
                return s
        raise KeyError(name)

    # ---- lifecycle -----------------------------------------------------------------------------
    def start(self) -> None:
        """Check ports, then spawn the workers and the coordinator (without waiting for readiness).

        Raises ``StackError`` naming the service whose port is taken; nothing is started then.
        """
        self._check_ports()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._record_probes()
        self.started_at = time.monotonic()
        try:
            for service in self.services:
                service.spawn(python=self.python, env=self.env, tie_to_parent=self.tie_to_parent)
        except BaseException:
            self.stop()
            raise
        self.write_state()

    def _record_probes(self) -> None:
        """Before vLLM workers start: the HF reference of every adapter they serve that has none
        (``mole probe-adapters``, in a process of its own so its model's memory is freed), which
        the coordinator checks them against. ``StackError`` when it fails."""
        from mole.probe import missing_probes

        if not any(w.engine == "vllm" and w.is_local() for w in self.mapping.workers):
            return
        if not missing_probes(self.mapping):
            return
        log = self.run_dir / "probe-adapters.log"
        command = [self.python, "-m", "mole.cli", "probe-adapters", "--config", str(self.mapping_path)]
        with log.open("w") as out:
            code = subprocess.call(
                command, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **self.env}
            )
        if code != 0:
            raise StackError(f"recording the adapters' probes failed (exit {code}); see {log}")

    def wait_ready(
        self, timeout_s: float = DEFAULT_READY_TIMEOUT_S, progress: ProgressFn | None = None
    ) -> None:
        """Poll every service's ``/health/ready`` until all answer 200 (see :func:`wait_ready`);
        ``progress(stack, elapsed_s)`` is called after every polling round."""
        wait_ready(self.services, timeout_s, None if progress is None else lambda t: progress(self, t))
        self.write_state()

    def supervise(self) -> list[str]:
        """One supervision round (``mole up`` runs one every half second once the stack is ready).

        A service that exited, or whose readiness says ``failed``, is scheduled for a restart after
        :attr:`restart_policy`'s backoff; one whose time came is respawned (its log appended to); a
        restarted one is polled until ready again. The other services are left alone throughout.
        Returns one line per event, for the caller to report; ``stack.json`` is rewritten on events.
        """
        events: list[str] = []
        now = time.monotonic()
        for s in self.services:
            if s.restart_at is not None:
                if now >= s.restart_at:
                    events.append(self._restart(s))
                continue
            if s.proc is None or s.state == "stopped":
                continue
            if not s.running():
                events.append(self._schedule_restart(s, now, f"exited with {_describe_exit(s.returncode)}"))
                continue
            if s.state == "ready":
                continue
            try:
                if s.poll_ready():
                    events.append(f"{s.name} ready again (restart {s.restarts}, pid {s.pid})")
            except ServiceFailed as exc:
                stop_together([s], self.stop_grace_s)
                events.append(self._schedule_restart(s, now, f"failed to load: {exc}"))
            except ServiceExited:
                events.append(self._schedule_restart(s, now, f"exited with {_describe_exit(s.returncode)}"))
        if events:
            self.write_state()
        return events

    def _schedule_restart(self, s: ServiceProcess, now: float, why: str) -> str:
        s.last_exit = s.returncode
        s._close_log()
        uptime = now - (s.started_at or now)
        s.crashes_in_a_row = 1 if uptime >= self.restart_policy.reset_after_s else s.crashes_in_a_row + 1
        delay = self.restart_policy.delay(s.crashes_in_a_row)
        s.state = "restarting"
        s.restart_at = now + delay
        return f"{s.name} {why}; restarting it in {delay:.1f}s, the other services keep serving"

    def _restart(self, s: ServiceProcess) -> str:
        s.restart_at = None
        s.restarts += 1
        s.ready_after_s = None
        with s.log_path.open("ab") as log:
            log.write(f"\n--- mole up: restart {s.restarts} of {s.name} ---\n".encode())
        s.spawn(python=self.python, env=self.env, tie_to_parent=self.tie_to_parent, append_log=True)
        return f"{s.name} restarted (restart {s.restarts}, pid {s.pid}); waiting until it is ready"

    def hurry(self) -> None:
        """Make a running or later :meth:`stop` skip the grace period (a second Ctrl-C)."""
        self._hurry = True

    def stop(self) -> None:
        """SIGTERM the coordinator and wait (it drains in-flight requests that need the workers),
        then SIGTERM the workers together; SIGKILL whatever outlives ``stop_grace_s``. Idempotent."""
        for s in self.services:
            s.restart_at = None  # a restart scheduled by supervise() does not happen any more
        for group in ([self.coordinator], self.workers):
            stop_together(group, self.stop_grace_s, hurried=lambda: self._hurry)
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
                    "restarts": s.restarts,
                    "last_exit": s.last_exit,
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


def _describe_exit(code: int | None) -> str:
    """``code 1`` or ``SIGKILL`` (Popen reports death by signal N as -N)."""
    if code is not None and code < 0:
        with contextlib.suppress(ValueError):
            return signal.Signals(-code).name
    return f"code {code}"


def _inprocess_worker_id(mapping: MoleMapping) -> str | None:
    """The worker a monolithic mapping's coordinator serves in-process (None when not monolithic)."""
    if not mapping.monolithic:
        return None
    from mole.monolithic import inprocess_worker

    return inprocess_worker(mapping).id


def _child_setup() -> None:
    """Runs in the child between fork and exec: unblock the stop signals and, on Linux, ask for
    SIGTERM when the parent dies without cleaning up (e.g. SIGKILL), so no child outlives it."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM))


@functools.cache
def _opener() -> urllib.request.OpenerDirector:
    return urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: no proxies


def _probe(url: str) -> tuple[State, str | None]:
    """(state, error): ``failed`` with the service's error when its readiness body says so."""
    try:
        with _opener().open(url, timeout=1.0) as resp:
            return ("ready" if resp.status == 200 else "loading"), None
    except urllib.error.HTTPError as exc:  # listening, answering 503 until the model is loaded
        try:
            body = json.loads(exc.read() or b"{}")
        except (OSError, ValueError):
            body = {}
        if isinstance(body, dict) and body.get("status") == "failed":
            return "failed", str(body.get("error") or "")
        return "loading", None
    except (OSError, ValueError):
        return "starting", None  # not listening yet (URLError, refused, timeout)


def _port_free(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True
