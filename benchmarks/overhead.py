"""Scenario 5: what the coordinator adds, and the router's single forward vs generate-and-parse.

On the real process stack, one request at a time, each screen is sent three ways in rotating order:
``/classify`` (router on), ``/classify`` with the expert named, and straight to the worker the
coordinator picked (``POST /infer``). Per screen:

- overhead = end-to-end(router) − the coordinator's route time − direct-worker time (the issue's
  definition: what a client pays beyond routing and the worker itself);
- explicit overhead = end-to-end(expert named) − direct-worker time (no router at all);
- internal = the coordinator's own ``timings_ms``: total − route − worker.

The router comparison runs in-process on one model (base + router LoRA): one forward + softmax over
the label tokens (what the coordinator does) against greedy generate-and-parse (the original design).
"""

from __future__ import annotations

import asyncio
import json
import os
import time

import httpx

from benchmarks.core import Check, Section, Table, ms, percentile, ratio, x
from benchmarks.env import BenchContext, make_inputs
from benchmarks.report import figure
from shared.images import decode_image
from shared.modeling import render_prompt
from shared.schemas import InferRequest

TARGET_MS = 5.0  # coordinator overhead p50
TOKENS = 1  # new tokens per request here: the overhead does not depend on it, the noise does


async def run(ctx: BenchContext) -> Section:
    section = Section("overhead", "5. Coordinator overhead and router cost")
    stack = await ctx.stack()
    original = await ctx.original()
    n = ctx.pick(80, 4)
    inputs = make_inputs(n, seed=505)
    rows: list[dict[str, float]] = []
    headers = {"content-type": "application/json"}
    async with httpx.AsyncClient(timeout=60.0) as client:

        async def timed(url: str, body: dict) -> tuple[float, dict]:
            content = json.dumps(body).encode()
            t0 = time.perf_counter()
            resp = await client.post(url, content=content, headers=headers)
            elapsed = (time.perf_counter() - t0) * 1000.0
            resp.raise_for_status()
            return elapsed, resp.json()

        base = {"max_new_tokens": TOKENS}
        await timed(
            f"{stack.coordinator.probe_url}/classify",
            {**base, "image_b64": inputs[0].image_b64, "prompt": "hi"},
        )
        for i, inp in enumerate(inputs):
            classify = {**base, "image_b64": inp.image_b64, "prompt": inp.prompt}
            # the router's pick decides which worker the direct call goes to, so it runs first;
            # the other two alternate
            t_router, routed = await timed(f"{stack.coordinator.probe_url}/classify", classify)
            direct_url = f"{stack.service(routed['worker_id']).probe_url}/infer"
            direct = {**classify, "adapter": routed["adapter"]}
            explicit = {**classify, "expert": routed["adapter"]}
            if i % 2 == 0:
                t_direct, _ = await timed(direct_url, direct)
                t_explicit, _ = await timed(f"{stack.coordinator.probe_url}/classify", explicit)
            else:
                t_explicit, _ = await timed(f"{stack.coordinator.probe_url}/classify", explicit)
                t_direct, _ = await timed(direct_url, direct)
            t0 = time.perf_counter()  # the floor: one loopback HTTP round trip that does no work
            (await client.get(f"{stack.coordinator.probe_url}/health/live")).raise_for_status()
            t_hop = (time.perf_counter() - t0) * 1000.0
            tm = routed["timings_ms"]
            rows.append(
                {
                    "overhead": t_router - tm["route"] - t_direct,
                    "explicit": t_explicit - t_direct,
                    "internal": tm["total"] - tm["route"] - tm["worker"],
                    "route": tm["route"],
                    "e2e": t_router,
                    "direct": t_direct,
                    "hop": t_hop,
                }
            )

    # router: one forward vs generate-and-parse, same model, same screens, interleaved
    m = ctx.pick(60, 4)
    screens = make_inputs(m, seed=506)
    fwd: list[float] = []
    gen: list[float] = []
    agree_fwd = agree_gen = parsed = 0
    for i, inp in enumerate(screens):
        order = ("forward", "generate") if i % 2 == 0 else ("generate", "forward")
        for kind in order:
            t0 = time.perf_counter()
            if kind == "forward":
                adapter = await asyncio.to_thread(original.route_forward, inp.image)
                fwd.append((time.perf_counter() - t0) * 1000.0)
                agree_fwd += adapter == inp.kind
            else:
                adapter, ok = await asyncio.to_thread(original.route_generate, inp.image)
                gen.append((time.perf_counter() - t0) * 1000.0)
                agree_gen += adapter == inp.kind
                parsed += ok

    # the per-request input work mole does twice (coordinator and worker each decode and process the
    # image) and the wire encoding of the body it forwards
    settings = ctx.settings()
    work: dict[str, list[float]] = {"decode": [], "process": [], "encode": []}
    for inp in screens:
        t0 = time.perf_counter()
        image = decode_image(
            inp.image_b64, max_bytes=settings.max_image_bytes, max_pixels=settings.max_image_pixels
        )
        t1 = time.perf_counter()
        original.processor(
            text=[render_prompt(original.processor, inp.prompt)], images=[image], return_tensors="pt"
        )
        t2 = time.perf_counter()
        InferRequest(image_b64=inp.image_b64, prompt=inp.prompt, adapter=inp.kind).model_dump_json()
        t3 = time.perf_counter()
        for key, a, b in (("decode", t0, t1), ("process", t1, t2), ("encode", t2, t3)):
            work[key].append((b - a) * 1000.0)

    section.method = (
        f"The real process stack (scenario 4), one request at a time, {n} screens of all four kinds. Each "
        "screen goes through `/classify` with the router, then — in alternating order — through `/classify` "
        "with the routed expert named, and straight to the worker the coordinator chose (`POST /infer`, "
        f"same adapter, image and prompt). {TOKENS} new token per request: the overhead does not depend on "
        "the answer's length, but generation jitter would otherwise swamp a few milliseconds. "
        "*Overhead* = end-to-end with router − the coordinator's reported route time − the direct-worker "
        "time of the same screen; *explicit* = end-to-end with the expert named − direct; *internal* = the "
        "coordinator's own `timings_ms` (total − route − worker: dispatch, the HTTP hop to the worker and "
        "back, building the answer)."
    )
    t = Table(["measure (ms)", "p50", "p99", "mean"])

    def row(label: str, values: list[float]) -> None:
        t.add(
            label,
            ms(percentile(values, 50), 2),
            ms(percentile(values, 99), 2),
            ms(sum(values) / len(values), 2),
        )

    row("**coordinator overhead** (e2e − route − direct)", [r["overhead"] for r in rows])
    row("explicit-expert overhead (e2e − direct)", [r["explicit"] for r in rows])
    row("coordinator-internal (total − route − worker)", [r["internal"] for r in rows])
    row("route time reported by the coordinator", [r["route"] for r in rows])
    row("end-to-end with router", [r["e2e"] for r in rows])
    row("direct to the worker", [r["direct"] for r in rows])
    row("one loopback HTTP round trip doing no work (GET /health/live)", [r["hop"] for r in rows])
    t.caption = f"{len(rows)} screens; every row is a percentile of per-screen values."
    section.tables.append(t)

    rt = Table(["router", "p50 ms", "p99 ms", "picked the screen's expert", "vs single forward (p50)"])
    rt.add(
        "single forward + softmax over label tokens (mole)",
        ms(percentile(fwd, 50), 2),
        ms(percentile(fwd, 99), 2),
        f"{agree_fwd}/{m}",
        "1.00×",
    )
    rt.add(
        "generate-and-parse (original design)",
        ms(percentile(gen, 50), 2),
        ms(percentile(gen, 99), 2),
        f"{agree_gen}/{m} ({parsed} parsed)",
        x(ratio(percentile(gen, 50), percentile(fwd, 50))),
    )
    rt.caption = (
        "In-process, the same model (base + router LoRA) and screens, interleaved; model time only. The "
        "coordinator's reported route time above also holds the image decode and the hand-off to the router "
        "batcher's thread (which waits up to max_wait_ms for company only while requests overlap)."
    )
    section.tables.append(rt)

    wt = Table(
        ["input work per request (in-process, one core)", "p50 ms", "p99 ms", "times per mole request"]
    )
    for key, label, times in (
        ("decode", "decode the base64 PNG (`decode_image`)", "2 (coordinator, worker)"),
        ("process", "chat template + tokenizer + image processor", "2 (router, worker)"),
        ("encode", "build and serialise the worker request (pydantic → JSON)", "1 (coordinator)"),
    ):
        wt.add(label, ms(percentile(work[key], 50), 2), ms(percentile(work[key], 99), 2), times)
    wt.caption = "Fixed per-request costs that do not shrink with batching, measured on the same screens."
    section.tables.append(wt)

    plot = "bench_overhead.png"
    with figure(ctx.options.plots / plot) as ax:
        for key, label in (
            ("overhead", "e2e − route − direct"),
            ("explicit", "explicit: e2e − direct"),
            ("internal", "coordinator-internal"),
        ):
            values = sorted(r[key] for r in rows)
            ax.plot(values, [(i + 1) / len(values) for i in range(len(values))], label=label)
        ax.axvline(TARGET_MS, color="grey", linestyle=":", label=f"target p50 < {TARGET_MS:g} ms")
        ax.set_xlabel("ms per request")
        ax.set_ylabel("fraction of requests")
        ax.set_title("Coordinator overhead (CDF)")
        ax.grid(alpha=0.3)
        ax.legend()
    section.plots.append(plot)

    p50 = percentile([r["overhead"] for r in rows], 50)
    met = p50 < TARGET_MS
    note = ""
    if not met:
        hop = percentile([r["hop"] for r in rows], 50)
        note = (
            f"Over by {p50 - TARGET_MS:.2f} ms ({p50 / TARGET_MS:.1f}× the target). Most of it is the extra "
            f"process hop: the coordinator's own accounting (internal, p50 "
            f"{percentile([r['internal'] for r in rows], 50):.2f} ms) covers sending the request to the "
            "worker, the worker's HTTP layer and the answer coming back, and on this machine a loopback "
            f"round trip that does no work already costs {hop:.2f} ms p50: with four Python model processes "
            f"and other test runs on {os.cpu_count()} cores, every cross-process wake-up waits for a core. The rest is "
            "the client-facing HTTP layer (parsing and validating the base64 body, building the answer). "
            "On a machine with a core per process the "
            "hop falls to a fraction of a millisecond; an in-process worker backend (the monolithic mode) "
            "or a binary body would remove it."
        )
    section.checks.append(
        Check(
            f"coordinator overhead < {TARGET_MS:g} ms p50",
            f"p50 {p50:.2f} ms, p99 {percentile([r['overhead'] for r in rows], 99):.2f} ms; router: single "
            f"forward {percentile(fwd, 50):.1f} ms vs generate-and-parse {percentile(gen, 50):.1f} ms p50",
            "met" if met else "missed",
            note,
        )
    )
    return section
