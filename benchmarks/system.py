"""Scenario 4: the whole system against the original single-server design, on the same machine.

- **baseline**: the original design in-process (:class:`benchmarks.baseline.OriginalServer`): decode
  the image, route by generate-and-parse with the router LoRA, ``set_adapter(adapter)``, generate; one
  request at a time. Given its better torch thread count (1 or 2, measured first).
- **mole**: ``POST /classify`` on a real ``mole coordinator`` process (router = one forward, batched)
  dispatching over loopback HTTP to the real worker processes ``merged-calendar``, ``merged-claim``
  and ``dynamic-0`` (login and desktop).

Same screens (all four experts, evenly), same prompts, concurrency 1 and 8. The CPU time every process
spends per request is recorded too: it bounds the throughput the machine's cores can give.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import httpx

from benchmarks.core import (
    Check,
    Run,
    Section,
    Table,
    closed_loop,
    cpu_seconds,
    loadavg,
    merge_runs,
    ms,
    ratio,
    x,
)
from benchmarks.env import MAX_NEW_TOKENS, BenchContext, Input, make_inputs
from benchmarks.report import figure
from mole.supervisor import Stack

TARGET = 2.0  # mole / baseline throughput at concurrency 8
System = Callable[[int, "Tally"], Awaitable[int]]
CONCURRENCY = (1, 8)


@dataclass
class Tally:
    """Answers checked, and CPU seconds per process, over a system's measured rounds."""

    routed: list[bool] = field(default_factory=list)
    exact: list[bool] = field(default_factory=list)
    cpu: dict[str, float] = field(default_factory=dict)

    def add_cpu(self, before: dict[str, float | None], after: dict[str, float | None]) -> None:
        for name, a in after.items():
            b = before.get(name)
            if a is not None and b is not None:
                self.cpu[name] = self.cpu.get(name, 0.0) + (a - b)


async def run(ctx: BenchContext) -> Section:
    import torch

    from shared.images import decode_image

    section = Section("system", "4. The whole system vs the original single-server design")
    stack = await ctx.stack()
    original = await ctx.original()
    inputs = make_inputs(64, seed=404)
    settings = ctx.settings()
    bodies = [json.dumps({"image_b64": i.image_b64, "prompt": i.prompt}).encode() for i in inputs]

    def serve_original(inp: Input) -> tuple[str, str]:
        image = decode_image(
            inp.image_b64, max_bytes=settings.max_image_bytes, max_pixels=settings.max_image_pixels
        )
        answer = original.handle(image, inp.prompt, MAX_NEW_TOKENS)
        return answer.adapter, answer.generated.text

    # the baseline gets its better thread count (it is one process; mole's processes use --threads)
    cuda = ctx.options.device.startswith("cuda")
    calibration: dict[int, float] = {}
    if not cuda and not ctx.quick:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            await asyncio.to_thread(serve_original, inputs[0])
            probe = await closed_loop(lambda i: _tokens0(asyncio.to_thread(serve_original, inputs[i])), 12, 1)
            calibration[threads] = probe.rps
    baseline_threads = max(calibration, key=lambda t: calibration[t]) if calibration else ctx.options.threads
    if not cuda:
        torch.set_num_threads(baseline_threads)

    tallies: dict[tuple[str, int], Tally] = {}
    results: dict[int, dict[str, Run]] = {}
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    async with httpx.AsyncClient(timeout=120.0, limits=limits) as client:

        async def mole(i: int, tally: Tally) -> int:
            inp = inputs[i % len(inputs)]
            resp = await client.post(
                f"{stack.coordinator.probe_url}/classify",
                content=bodies[i % len(bodies)],
                headers={"content-type": "application/json"},
            )
            resp.raise_for_status()
            body = resp.json()
            tally.routed.append(body["adapter"] == inp.kind)
            tally.exact.append(body["output"] == inp.expected(inp.kind))
            return 0

        async def baseline(i: int, tally: Tally) -> int:
            inp = inputs[i % len(inputs)]
            adapter, text = await asyncio.to_thread(serve_original, inp)
            tally.routed.append(adapter == inp.kind)
            tally.exact.append(text == inp.expected(inp.kind))
            return 0

        systems: dict[str, System] = {"baseline": baseline, "mole": mole}
        # warm both paths (connections, executor threads) before measuring
        await mole(0, Tally())
        await baseline(0, Tally())
        rounds = ctx.pick(2, 1)
        for c in ctx.pick(CONCURRENCY, (1, 8)):
            n = ctx.pick(48 if c == 1 else 96, 8)
            per_round = n // rounds
            runs: dict[str, list[Run]] = {name: [] for name in systems}
            for rnd in range(rounds):
                order = list(systems) if rnd % 2 == 0 else list(systems)[::-1]
                for name in order:
                    tally = tallies.setdefault((name, c), Tally())
                    offset = rnd * per_round
                    call = systems[name]

                    async def one(
                        i: int, call: System = call, tally: Tally = tally, offset: int = offset
                    ) -> int:
                        return await call(offset + i, tally)

                    before = _cpu_snapshot(stack)
                    runs[name].append(await closed_loop(one, per_round, c))
                    tally.add_cpu(before, _cpu_snapshot(stack))
            results[c] = {name: merge_runs(rs) for name, rs in runs.items()}
    if not cuda:
        torch.set_num_threads(ctx.options.threads)

    section.method = (
        "**Baseline** — the original single-server design reproduced in-process: one `PeftModel` with the "
        "router LoRA and the expert LoRAs; per request: decode the image, `set_adapter('router')` and "
        "generate-and-parse the label, `set_adapter(adapter)`, generate; one request at a time (a lock), "
        f"torch threads = {baseline_threads}"
        + (
            " (the better of 1 and 2, measured first: "
            + ", ".join(f"{t} thread{'s' if t > 1 else ''} {v:.1f} req/s" for t, v in calibration.items())
            + ")"
            if calibration
            else ""
        )
        + ". **mole** — `POST /classify` on a real `mole coordinator` process (router: one batched forward "
        "+ softmax over the label tokens), dispatching over loopback HTTP to the real `mole worker` "
        "processes `merged-calendar`, `merged-claim` (merged checkpoints) and `dynamic-0` (login, desktop); "
        f"{ctx.options.threads} torch thread(s) per process, all four processes and the load generator on "
        "the same machine. The same screens of all four kinds (evenly) and prompts, greedy, at most 16 new "
        "tokens; closed-loop clients, the two systems in alternating rounds."
    )
    t = Table(
        [
            "system",
            "concurrency",
            "req/s",
            "p50 ms",
            "p99 ms",
            "routed to the right expert",
            "exact answers",
            "throughput vs baseline",
        ]
    )
    for c, r in results.items():
        for name in ("baseline", "mole"):
            run_, tally = r[name], tallies[(name, c)]
            t.add(
                name,
                c,
                f"{run_.rps:.1f}",
                ms(run_.p50),
                ms(run_.p99),
                f"{sum(tally.routed)}/{len(tally.routed)}",
                f"{sum(tally.exact)}/{len(tally.exact)}",
                x(ratio(run_.rps, r["baseline"].rps)),
            )
    section.tables.append(t)

    c_top = max(results)
    cpu_t = Table(["process", "CPU ms per request (baseline)", "CPU ms per request (mole)"])
    n_base = len(tallies[("baseline", c_top)].routed)
    n_mole = len(tallies[("mole", c_top)].routed)
    base_cpu = tallies[("baseline", c_top)].cpu
    mole_cpu = tallies[("mole", c_top)].cpu
    for name in ["bench", *(p.name for p in stack.services)]:
        label = "load generator + in-process baseline" if name == "bench" else name
        b = base_cpu.get(name, 0.0) * 1000 / max(1, n_base)
        m = mole_cpu.get(name, 0.0) * 1000 / max(1, n_mole)
        cpu_t.add(label, ms(b) if name == "bench" else "—", ms(m))
    mole_total = sum(mole_cpu.values()) * 1000 / max(1, n_mole)
    base_total = base_cpu.get("bench", 0.0) * 1000 / max(1, n_base)
    cpu_t.add("**total**", ms(base_total), ms(mole_total))
    cores = os.cpu_count() or 1
    cpu_t.caption = (
        f"Where the CPU goes at concurrency {c_top} (user + system time of each process over the measured "
        "rounds, divided by the requests served). At concurrency 8 mole's ceiling on this machine is "
        f"{cores} cores / total CPU per request."
    )
    section.tables.append(cpu_t)

    plot = "bench_system.png"
    with figure(ctx.options.plots / plot) as ax:
        cs = list(results)
        width = 0.38
        xs = range(len(cs))
        ax.bar(
            [i - width / 2 for i in xs],
            [results[c]["baseline"].rps for c in cs],
            width,
            label="original design",
        )
        ax.bar([i + width / 2 for i in xs], [results[c]["mole"].rps for c in cs], width, label="mole")
        ax.set_xticks(list(xs), [f"concurrency {c}" for c in cs])
        ax.set_ylabel("requests / s (end to end)")
        ax.set_title("mole vs the original single-server design")
        ax.grid(alpha=0.3, axis="y")
        ax.legend()
    section.plots.append(plot)

    gain = ratio(results[c_top]["mole"].rps, results[c_top]["baseline"].rps)
    met = gain >= TARGET
    note = ""
    if not met:
        ceiling = cores * 1000.0 / mole_total if mole_total > 0 else float("nan")
        coord = mole_cpu.get("coordinator", 0.0) * 1000 / max(1, n_mole)
        base_rps = results[c_top]["baseline"].rps
        note = (
            f"Short by {TARGET - gain:.2f}× ({(1 - gain / TARGET) * 100:.0f}% below target). mole spends "
            f"{mole_total:.1f} ms of CPU per request across its processes against the baseline's "
            f"{base_total:.1f} ms (table above): its gain comes from batching and from using every core, and "
            f"this machine's other load (load average {loadavg()[0]:.1f} on {cores} cores at the end of the "
            f"run) leaves it less than the second core. With the cores to itself its ceiling would be about "
            f"{ceiling:.0f} req/s, {x(ratio(ceiling, base_rps))} the measured baseline. At this model size the "
            f"model step is a few ms and fixed per-request costs dominate: the coordinator alone spends "
            f"{coord:.1f} ms of CPU per request (HTTP server and client, JSON with a base64 image both ways, "
            "decoding the image, the router forward), and each worker decodes the image again behind its own "
            "HTTP layer. With a real-size model (or a GPU) the model step dominates and batching + merged "
            "checkpoints carry the ratio; on CPU, forwarding the decoded image instead of re-decoding it, a "
            "binary body instead of JSON+base64, and the monolithic mode (router and a dynamic worker in one "
            "process, no hop) would cut the fixed cost."
        )
    c_low = min(results)
    if results[c_low]["mole"].rps < results[c_low]["baseline"].rps:
        section.notes.append(
            f"At concurrency {c_low} mole is slower than the baseline "
            f"({x(ratio(results[c_low]['mole'].rps, results[c_low]['baseline'].rps))}; p50 "
            f"{results[c_low]['mole'].p50:.1f} vs {results[c_low]['baseline'].p50:.1f} ms): a lone request "
            "crosses two HTTP hops and two batcher hand-offs (router and worker), while on a model "
            "this small the router's single forward saves little over a two-token generate-and-parse and the "
            "merged checkpoint only helps the two hot experts. mole's design pays off under concurrency."
        )
    section.checks.append(
        Check(
            f"mole ≥ {TARGET:g}× the baseline's throughput at concurrency 8",
            f"{x(gain)} at concurrency {c_top} ({results[c_top]['mole'].rps:.1f} vs "
            f"{results[c_top]['baseline'].rps:.1f} req/s); at concurrency 1 "
            f"{x(ratio(results[min(results)]['mole'].rps, results[min(results)]['baseline'].rps))}",
            "met" if met else "missed",
            note,
        )
    )
    return section


async def _tokens0(awaitable: Awaitable[object]) -> int:
    await awaitable
    return 0


def _cpu_snapshot(stack: Stack) -> dict[str, float | None]:
    snap: dict[str, float | None] = {"bench": cpu_seconds()}
    for p in stack.services:
        snap[p.name] = cpu_seconds(p.proc.pid) if p.proc is not None else None
    return snap
