"""Measurement primitives: a closed-loop load generator, percentiles, memory and machine facts,
and the typed result of a scenario (:class:`Section`) that :mod:`benchmarks.report` renders.

Every figure the suite reports comes from one run: scenarios measure the things they compare side
by side (interleaved where the machine's load could drift) and report ratios and percentiles.
"""

from __future__ import annotations

import asyncio
import os
import platform
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) with linear interpolation (numpy's default); NaN when empty."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


@dataclass
class Run:
    """One measured load: per-request latencies (seconds), wall time, tokens generated."""

    latencies: list[float]
    wall_s: float
    tokens: int = 0
    concurrency: int = 1

    @property
    def n(self) -> int:
        return len(self.latencies)

    @property
    def rps(self) -> float:
        return self.n / self.wall_s if self.wall_s > 0 else float("nan")

    @property
    def tps(self) -> float:
        return self.tokens / self.wall_s if self.wall_s > 0 else float("nan")

    def p(self, q: float) -> float:
        """Latency percentile in milliseconds."""
        return percentile(self.latencies, q) * 1000.0

    @property
    def p50(self) -> float:
        return self.p(50)

    @property
    def p99(self) -> float:
        return self.p(99)


Call = Callable[[int], Awaitable[int]]  # request i -> tokens generated


async def closed_loop(call: Call, n: int, concurrency: int) -> Run:
    """Run requests ``0..n-1`` with ``concurrency`` clients, each sending its next request as soon as
    its previous one is answered. A failed request fails the measurement (a benchmark that drops
    errors would report the speed of failing)."""
    latencies: list[float] = []
    tokens = 0
    next_index = 0

    async def client() -> None:
        nonlocal next_index, tokens
        while next_index < n:
            i = next_index
            next_index += 1
            t0 = time.perf_counter()
            got = await call(i)  # not `tokens += await ...`: that reads `tokens` before awaiting
            latencies.append(time.perf_counter() - t0)
            tokens += got

    t0 = time.perf_counter()
    async with asyncio.TaskGroup() as group:  # one failure cancels the other clients
        for _ in range(max(1, min(concurrency, n))):
            group.create_task(client())
    return Run(latencies, time.perf_counter() - t0, tokens, concurrency)


def ratio(a: float, b: float) -> float:
    """``a / b``, NaN when ``b`` is zero or either is NaN."""
    if b == 0 or a != a or b != b:
        return float("nan")
    return a / b


# ---- memory -------------------------------------------------------------------------------------


def rss_mb(pid: int | None = None) -> float | None:
    """Resident set size of a process in MiB from ``/proc`` (None where ``/proc`` is missing)."""
    path = Path(f"/proc/{pid or 'self'}/status")
    try:
        for line in path.read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        return None
    return None


def cpu_seconds(pid: int | None = None) -> float | None:
    """User + system CPU time of a process (all its threads) from ``/proc``; this process when ``pid``
    is None (``time.process_time``)."""
    if pid is None:
        return time.process_time()
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def group_cpu_seconds(pgid: int) -> float | None:
    """User + system CPU time of every live process in process group ``pgid`` (a service started in
    its own session, with the helpers it spawned: vLLM's engine core runs in a child process); None
    where ``/proc`` is missing. A child that already exited is not counted."""
    total, found = 0.0, False
    tick = os.sysconf("SC_CLK_TCK")
    try:
        entries = [e for e in os.listdir("/proc") if e.isdigit()]
    except OSError:
        return None
    for entry in entries:
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone since the listing
            continue
        if int(fields[2]) == pgid:  # pgrp
            total += (int(fields[11]) + int(fields[12])) / tick
            found = True
    return total if found else None


def tensor_mb(model: Any) -> float:
    """Bytes held by a model's parameters and buffers, in MiB (exact, device-independent)."""
    total = sum(t.numel() * t.element_size() for t in model.parameters())
    total += sum(t.numel() * t.element_size() for t in model.buffers())
    return total / 2**20


def param_count(model: Any) -> int:
    return int(sum(p.numel() for p in model.parameters()))


def loadavg() -> tuple[float, float, float]:
    try:
        return os.getloadavg()
    except OSError:
        return (float("nan"),) * 3


# ---- machine ------------------------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _ram_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return None


def machine_facts(device: str) -> dict[str, str]:
    """What the numbers were measured on (CPU, cores, RAM, OS, library versions, accelerator)."""
    import peft
    import torch
    import transformers

    ram = _ram_gib()
    facts = {
        "CPU": _cpu_model(),
        "logical cores": str(os.cpu_count()),
        "RAM": f"{ram:.1f} GiB" if ram else "unknown",
        "OS": f"{platform.system()} {platform.release()}",
        "Python": platform.python_version(),
        "torch / transformers / peft": f"{torch.__version__} / {transformers.__version__} / {peft.__version__}",
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        facts["GPU"] = torch.cuda.get_device_name(torch.device(device))
    return facts


# ---- results ------------------------------------------------------------------------------------


@dataclass
class Table:
    """A markdown table: header cells and rows of already formatted cells."""

    header: list[str]
    rows: list[list[str]] = field(default_factory=list)
    caption: str = ""

    def add(self, *cells: object) -> None:
        self.rows.append([str(c) for c in cells])


Verdict = Literal["met", "missed", "info"]


@dataclass
class Check:
    """One target of the issue, the figure measured for it, and whether it was met."""

    target: str
    measured: str
    verdict: Verdict
    note: str = ""  # on a miss: by how much, why, what would close it


@dataclass
class Section:
    """One scenario's results: method text, tables, plots (file names), checks and load average."""

    key: str
    title: str
    method: str = ""
    tables: list[Table] = field(default_factory=list)
    plots: list[str] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    load_before: tuple[float, float, float] = (0.0, 0.0, 0.0)
    load_after: tuple[float, float, float] = (0.0, 0.0, 0.0)


def ms(value: float, digits: int = 1) -> str:
    """Milliseconds formatted for a table."""
    return "n/a" if value != value else f"{value:.{digits}f}"


def x(value: float) -> str:
    """A ratio formatted as ``1.23×``."""
    return "n/a" if value != value else f"{value:.2f}×"


def merge_runs(runs: Sequence[Run]) -> Run:
    """Several measured rounds of one system as one run (latencies pooled, wall times added)."""
    return Run(
        [lat for r in runs for lat in r.latencies],
        sum(r.wall_s for r in runs),
        sum(r.tokens for r in runs),
        runs[0].concurrency if runs else 1,
    )


async def side_by_side(
    calls: dict[str, Call], n: int, concurrency: int | dict[str, int], rounds: int = 2
) -> dict[str, Run]:
    """Measure each system in ``calls`` with the same ``n`` requests at ``concurrency`` (one value, or
    one per system), split into ``rounds`` alternating rounds (A B, B A, ...) so that a drift in the
    machine's load hits every system alike. Request indices are the same for every system."""
    per_system = concurrency if isinstance(concurrency, dict) else dict.fromkeys(calls, concurrency)
    rounds = max(1, min(rounds, n))
    per = [n // rounds + (1 if r < n % rounds else 0) for r in range(rounds)]
    results: dict[str, list[Run]] = {name: [] for name in calls}
    names = list(calls)
    start = 0
    for r, count in enumerate(per):
        order = names if r % 2 == 0 else names[::-1]
        for name in order:
            call = calls[name]
            offset = start

            async def shifted(i: int, call: Call = call, offset: int = offset) -> int:
                return await call(offset + i)

            results[name].append(await closed_loop(shifted, count, per_system[name]))
        start += count
    return {name: merge_runs(runs) for name, runs in results.items()}
