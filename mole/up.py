"""``mole up``: run a mapping's coordinator and its local workers as child processes.

The supervising is :class:`mole.supervisor.Stack`'s (``mole demo`` and the benchmarks drive it
too); this module is the command on top: progress, the service table, signals. Once every service
is ready, a service that dies is restarted with backoff and reported (:meth:`Stack.supervise`)
while the others keep serving. The first Ctrl-C/SIGTERM stops the stack gracefully, a second one
skips the grace period.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import time
from collections.abc import Callable, Iterator
from types import FrameType
from typing import IO

from mole.supervisor import STOP_SIGNALS, Stack, StackError
from shared.errors import ConfigError


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

    previous = {sig: signal.signal(sig, handler) for sig in STOP_SIGNALS}
    try:
        yield mark_stopping
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def run(args: argparse.Namespace) -> int:
    """``mole up``: start, show progress, print the table, wait for Ctrl-C/SIGTERM, stop.

    Exit codes: 0 after a requested stop, 1 when a service failed or was not ready in time during
    start-up, 2 for a bad mapping or a port already in use. After start-up a crashed service is
    restarted (with backoff) instead.
    """
    from shared.settings import Settings

    # A child may use its drain timeout twice: uvicorn waits for in-flight requests, then the app's
    # shutdown drains its batcher.
    grace = 2 * Settings().drain_timeout_s + 5.0
    try:
        stack = Stack(args.config, run_dir=args.log_dir, stop_grace_s=grace)
    except (ConfigError, StackError) as exc:
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
                for event in stack.supervise():
                    print(f"mole up: {event}", file=sys.stderr, flush=True)
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
