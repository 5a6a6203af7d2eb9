"""Scenario 2: micro-batching on vs off on the same merged worker.

Two in-process ``WorkerService`` instances of ``merged-calendar``: the default batcher (max batch 8,
5 ms window while requests overlap) and the same worker with ``max_batch_size=1`` (every request its own generate call).
Throughput (requests/s, generated tokens/s) and latency at concurrency 1, 2, 4, 8, 16.
"""

from __future__ import annotations

from benchmarks.core import Check, Section, Table, ms, ratio, x
from benchmarks.env import BenchContext, make_inputs, service_calls
from benchmarks.report import figure

ADAPTER = "calendar"
CONCURRENCY = (1, 2, 4, 8, 16)
TARGET = 2.5  # batching on / off throughput at concurrency 8


async def run(ctx: BenchContext) -> Section:
    section = Section("batching", "2. Micro-batching")
    on = await ctx.start_worker(ctx.mapping, "merged-calendar")
    off = await ctx.start_worker(ctx.mapping, "merged-calendar", max_batch_size=1)
    services = {"on": on, "off": off}
    inputs = make_inputs(64, seed=202, kinds=(ADAPTER,))
    try:
        calls = service_calls(services, inputs, ADAPTER)
        results = await ctx.throughput_sweep(calls, CONCURRENCY)
    finally:
        for service in services.values():
            service.drain()

    section.method = (
        f"`merged-calendar` as the real in-process `WorkerService`, twice: batching **on** (the default: "
        f"max batch {on.settings.max_batch_size}, {on.settings.max_wait_ms:g} ms window) and batching "
        "**off** (`max_batch_size=1`). The same calendar screens and prompts, greedy, at most 16 new tokens; "
        "closed-loop clients at each concurrency, the two workers measured in alternating rounds."
    )
    t = Table(
        [
            "concurrency",
            "on req/s",
            "off req/s",
            "on / off",
            "on tok/s",
            "off tok/s",
            "on p50 ms",
            "off p50 ms",
            "on p99 ms",
            "off p99 ms",
        ]
    )
    for c, r in results.items():
        a, b = r["on"], r["off"]
        t.add(
            c,
            f"{a.rps:.1f}",
            f"{b.rps:.1f}",
            x(ratio(a.rps, b.rps)),
            f"{a.tps:.0f}",
            f"{b.tps:.0f}",
            ms(a.p50),
            ms(b.p50),
            ms(a.p99),
            ms(b.p99),
        )
    section.tables.append(t)

    plot = "bench_batching.png"
    with figure(ctx.options.plots / plot, ncols=2, size=(5.0, 3.8)) as axes:
        cs = list(results)
        for ax, attr, label in ((axes[0], "rps", "requests / s"), (axes[1], "tps", "generated tokens / s")):
            for name, style in (("on", "o-"), ("off", "s--")):
                ax.plot(cs, [getattr(results[c][name], attr) for c in cs], style, label=f"batching {name}")
            ax.set_xscale("log", base=2)
            ax.set_xticks(cs, [str(c) for c in cs])
            ax.set_ylim(bottom=0)
            ax.set_xlabel("concurrent clients")
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
            ax.legend()
        axes[0].set_title("Micro-batching: throughput")
        axes[1].set_title("Micro-batching: tokens")
    section.plots.append(plot)

    c8 = 8 if 8 in results else max(results)
    gain = ratio(results[c8]["on"].rps, results[c8]["off"].rps)
    met = gain >= TARGET
    note = ""
    if not met:
        off_ms = 1000.0 / results[c8]["off"].rps
        note = (
            f"Short by {TARGET - gain:.2f}× ({(1 - gain / TARGET) * 100:.0f}% below target). Batching only "
            f"amortises the model step; each request also pays fixed per-request work outside the model (image "
            f"decode, prompt rendering, thread hand-offs; about {off_ms:.1f} ms of CPU per request in total "
            "unbatched) that a batch does not share, and the machine's other load takes CPU from the one "
            "compute thread. A larger model (or a GPU) makes the model step dominate and the ratio approach "
            "the raw batch speed-up."
        )
    if 1 in results and results[1]["on"].rps < results[1]["off"].rps:
        a, b = results[1]["on"], results[1]["off"]
        section.notes.append(
            f"At concurrency 1 batching costs {(1 - ratio(a.rps, b.rps)) * 100:.0f}% of throughput (p50 "
            f"{a.p50:.1f} vs {b.p50:.1f} ms): a lone request runs at once (the batcher only waits "
            f"{on.settings.max_wait_ms:g} ms for company while requests overlap), so what remains is the "
            "hand-off to the batcher's thread and the machine's load noise."
        )
    section.checks.append(
        Check(
            f"batching ≥ {TARGET}× throughput at concurrency 8 vs off",
            f"{x(gain)} at concurrency {c8} ({results[c8]['on'].rps:.1f} vs {results[c8]['off'].rps:.1f} req/s)",
            "met" if met else "missed",
            note,
        )
    )
    return section
