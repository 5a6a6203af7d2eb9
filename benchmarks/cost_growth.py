"""Scenario 6: how costs grow — adapters loaded, replicas vs one dynamic worker, image size,
checkpoint size.

- Dynamic workers (real in-process ``WorkerService``) start with 1 adapter and hot-load more through
  ``load_adapter`` up to 2, 4, 8, 16 (the 4 trained LoRAs, then aliases of them); then, side by side:
  latency of one adapter's requests on each, tensor memory, hot-load time.
- Memory of N merged replicas (one full checkpoint each) against one dynamic worker holding N LoRAs.
- Latency against image size (224, 448, 896 px squares and the demo's 128×96): with the demo processor,
  which resizes every image under its 128×128-pixel cap, and with a copy of the merged checkpoint
  whose ``preprocessor_config.json`` raises the cap to 1024×1024 pixels, so larger images really cost
  more image tokens.
- Start-up (load + warm-up until ready) against checkpoint size: random-initialised Qwen3-VL
  checkpoints of growing width built with the demo builder (cached in the work folder).
"""

from __future__ import annotations

import asyncio
import gc
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from benchmarks.core import (
    Call,
    Check,
    Run,
    Section,
    Table,
    ms,
    param_count,
    percentile,
    ratio,
    rss_mb,
    side_by_side,
    tensor_mb,
    x,
)
from benchmarks.env import BenchContext, Input, infer_request, make_inputs
from benchmarks.report import figure
from mole import synthetic

if TYPE_CHECKING:
    from worker.service import WorkerService

ADAPTER = "calendar"
ADAPTER_LEVELS = (1, 2, 4, 8, 16)
IMAGE_SIZES = (224, 448, 896)  # square screens, resized from the drawn 128×96
RAISED_MAX_PIXELS = 1024 * 1024  # the hi-res processor copy's cap (896² fits)
FLAT = 1.10  # latency at 16 adapters within 10% of 1 adapter counts as flat
# (text width, text layers, vision width) of the start-up checkpoints; the first is the demo's own size
CHECKPOINTS = ((64, 2, 32), (256, 4, 128), (512, 8, 256), (1024, 8, 512))
START_REPEATS = 3  # start-ups per checkpoint (median reported)


@dataclass
class AdapterStep:
    adapters: int
    run: Run
    tensor_mb: float
    load_s: float  # time to hot-load this level's adapters after the first


@dataclass
class StartUp:
    label: str
    params: int
    disk_mb: float
    ready_s: float


def _calls(service: WorkerService, inputs: list[Input], adapter: str) -> Call:
    async def call(i: int) -> int:
        resp = await service.infer(infer_request(inputs[i % len(inputs)], adapter))
        return resp.tokens_generated

    return call


async def _adapters(ctx: BenchContext) -> list[AdapterStep]:
    """One dynamic worker per level, each grown from 1 adapter by hot loads, then measured side by side
    (alternating rounds), so that the machine's load drifts over all levels alike."""
    mapping = ctx.bench_mapping([{"id": "bench-dynamic-1", "mode": "dynamic", "adapters": [ADAPTER]}])
    extra = [(k, ctx.mapping.adapters[k].lora) for k in synthetic.KINDS if k != ADAPTER]
    extra += list(ctx.alias_paths(12).items())
    inputs = make_inputs(32, seed=606, kinds=(ADAPTER,))
    services: dict[int, WorkerService] = {}
    load_s: dict[int, float] = {}
    try:
        for level in ctx.pick(ADAPTER_LEVELS, (1, 4)):
            service = await ctx.start_worker(mapping, "bench-dynamic-1")
            services[level] = service
            t0 = time.perf_counter()
            for name, path in extra[: level - 1]:
                await service.load_adapter(name, path)
            load_s[level] = time.perf_counter() - t0
        calls = {str(level): _calls(service, inputs, ADAPTER) for level, service in services.items()}
        n = ctx.pick(48, 4)
        runs = await side_by_side(calls, n, 1, rounds=n // 2)  # two requests per level per round
        return [
            AdapterStep(level, runs[str(level)], tensor_mb(service.holder.model), load_s[level])
            for level, service in services.items()
        ]
    finally:
        for service in services.values():
            service.drain()


def _hires_copy(src: Path, dst: Path) -> Path:
    """``src`` with every file linked except ``preprocessor_config.json``, whose pixel cap is raised."""
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        target = dst / f.name
        if f.name == "preprocessor_config.json" or not f.is_file():
            continue
        if not target.exists():
            target.symlink_to(f.resolve())
    cfg = json.loads((src / "preprocessor_config.json").read_text())
    cfg["size"] = {**cfg.get("size", {}), "longest_edge": RAISED_MAX_PIXELS}
    (dst / "preprocessor_config.json").write_text(json.dumps(cfg, indent=2))
    return dst


async def _image_sizes(
    ctx: BenchContext,
) -> tuple[dict[str, dict[str, Run]], dict[str, dict[str, int]], float]:
    """Per size label: {"demo cap", "raised cap"} runs, image tokens, and the merged model's tensor MiB."""
    from shared.modeling import render_prompt

    merged_path = Path(ctx.mapping.model_path("merged-calendar"))
    hires = _hires_copy(merged_path, ctx.options.work / "hires-calendar")
    mapping = ctx.bench_mapping(
        [{"id": "bench-merged-hires", "mode": "merged", "adapters": [ADAPTER], "model": str(hires)}]
    )
    services = {
        "demo cap": await ctx.start_worker(mapping, "merged-calendar"),
        "raised cap": await ctx.start_worker(mapping, "bench-merged-hires"),
    }
    merged_mb = tensor_mb(services["demo cap"].holder.model)
    sizes: list[tuple[str, tuple[int, int] | None]] = [("128×96 (demo)", None)]
    sizes += [(f"{s}×{s}", (s, s)) for s in ctx.pick(IMAGE_SIZES, (224, 896))]
    tokens: dict[str, dict[str, int]] = {}
    calls: dict[str, Call] = {}
    try:
        for label, size in sizes:
            inputs = make_inputs(16, seed=616, kinds=(ADAPTER,), size=size)
            tokens[label] = {}
            for name, service in services.items():
                processor = service.holder.processor
                text = render_prompt(processor, inputs[0].prompt)
                ids = processor(text=[text], images=[inputs[0].image], return_tensors="pt")["input_ids"]
                tokens[label][name] = int(ids.shape[1])
                calls[f"{label}|{name}"] = _calls(service, inputs, ADAPTER)
        # every (size, cap) pair in alternating rounds: sizes are compared under the same load too
        n = ctx.pick(24, 2)
        measured = await side_by_side(calls, n, 1, rounds=n // 2)
    finally:
        for service in services.values():
            service.drain()
    runs = {label: {name: measured[f"{label}|{name}"] for name in services} for label, _ in sizes}
    return runs, tokens, merged_mb


def _checkpoint(ctx: BenchContext, width: int, layers: int, vision: int) -> Path:
    """A random-initialised tiny-Qwen3-VL-shaped checkpoint of the given size (built once, cached)."""
    from mole.demo_assets import Recipe, build_base

    if (width, layers, vision) == CHECKPOINTS[0]:
        return Path(ctx.mapping.base_model)
    out = ctx.options.work / "checkpoints" / f"w{width}-l{layers}-v{vision}"
    stamp = out / "bench_checkpoint.json"
    if not stamp.exists():
        build_base(out, Recipe(text_hidden=width, text_layers=layers, vision_hidden=vision))
        stamp.write_text(json.dumps({"width": width, "layers": layers, "vision": vision}) + "\n")
    return out


async def _start_ups(ctx: BenchContext) -> list[StartUp]:
    """Median of ``START_REPEATS`` in-process start-ups per checkpoint, checkpoints in rotating order."""
    shapes = ctx.pick(CHECKPOINTS, CHECKPOINTS[:1])
    paths = [await asyncio.to_thread(_checkpoint, ctx, *shape) for shape in shapes]
    mapping = ctx.bench_mapping(
        [
            {"id": f"bench-size-{i}", "mode": "merged", "adapters": [ADAPTER], "model": str(path)}
            for i, path in enumerate(paths)
        ]
    )
    times: dict[int, list[float]] = {i: [] for i in range(len(paths))}
    params: dict[int, int] = {}
    for r in range(ctx.pick(START_REPEATS, 1)):
        order = list(times) if r % 2 == 0 else list(times)[::-1]
        for i in order:
            t0 = time.perf_counter()
            service = await ctx.start_worker(mapping, f"bench-size-{i}")
            times[i].append(time.perf_counter() - t0)
            params[i] = param_count(service.holder.model)
            service.drain()
            del service
            gc.collect()
    out = []
    for i, ((width, layers, vision), path) in enumerate(zip(shapes, paths, strict=True)):
        disk = sum(f.stat().st_size for f in path.glob("*.safetensors")) / 2**20
        label = f"{width}×{layers} text, {vision} vision"
        out.append(StartUp(label, params[i], disk, percentile(times[i], 50)))
    return out


async def run(ctx: BenchContext) -> Section:
    section = Section("cost-growth", "6. Cost growth")
    steps = await _adapters(ctx)
    size_runs, size_tokens, merged_mb = await _image_sizes(ctx)
    starts = await _start_ups(ctx)
    stack = ctx.stack_started

    section.method = (
        "All on the real in-process `WorkerService`, one request at a time (latency = service time). "
        "**Adapters**: dynamic workers start with the calendar LoRA and hot-load more through "
        "`load_adapter` (the other three trained LoRAs, then aliases of them) up to 1, 2, 4, 8, 16; then the "
        "calendar adapter's latency on each (measured side by side) and the model's tensor memory "
        "(parameters + buffers, exact). **Image size**: the demo "
        "processor caps images at 128×128 pixels, so larger screens are downscaled to the same 16 image "
        "tokens; a copy of `merged/calendar` whose `preprocessor_config.json` raises the cap to 1024×1024 "
        "pixels shows what larger images really cost. **Start-up**: load + warm-up until ready for "
        "random-initialised checkpoints of growing width (built once with the demo builder, cached)."
    )

    at = Table(["adapters loaded", "p50 ms", "p99 ms", "vs 1 adapter (p50)", "tensor MiB", "hot-load s"])
    first = steps[0]
    for s in steps:
        at.add(
            s.adapters,
            ms(s.run.p50),
            ms(s.run.p99),
            x(ratio(s.run.p50, first.run.p50)),
            f"{s.tensor_mb:.2f}",
            f"{s.load_s:.2f}",
        )
    at.caption = (
        f"One dynamic worker per row, grown from 1 adapter by hot loads (`load_adapter`); requests for "
        f"`{ADAPTER}` only, n={first.run.n} per row, the rows measured in alternating rounds."
    )
    section.tables.append(at)

    lora_mb = (steps[-1].tensor_mb - first.tensor_mb) / max(1, steps[-1].adapters - first.adapters)
    base_mb = first.tensor_mb - lora_mb
    mt = Table(
        [
            "adapters served",
            "N merged replicas, tensor MiB",
            "one dynamic worker, tensor MiB",
            "merged / dynamic",
        ]
    )
    for s in steps:
        mt.add(
            s.adapters,
            f"{s.adapters * merged_mb:.2f}",
            f"{s.tensor_mb:.2f}",
            x(ratio(s.adapters * merged_mb, s.tensor_mb)),
        )
    mt.caption = (
        f"A merged replica holds a full checkpoint ({merged_mb:.2f} MiB of tensors); the dynamic worker holds "
        f"the base ({base_mb:.2f} MiB) plus {lora_mb:.3f} MiB per LoRA (measured above)."
    )
    if stack is not None:
        rss = {p.name: rss_mb(p.pid) for p in stack.services if p.pid is not None}
        mt.caption += (
            " At this size whole processes dominate: resident memory of the scenario-4 processes is "
            + ", ".join(f"`{k}` {v:.0f} MiB" for k, v in rss.items() if v is not None)
            + ", so N merged replicas cost N interpreters with torch loaded, the dynamic worker one."
        )
    section.tables.append(mt)

    it = Table(
        [
            "image",
            "tokens (demo cap)",
            "p50 ms (demo cap)",
            "tokens (raised cap)",
            "p50 ms (raised cap)",
            "p99 ms (raised cap)",
            "raised / demo (p50)",
        ]
    )
    for label, runs in size_runs.items():
        a, b = runs["demo cap"], runs["raised cap"]
        it.add(
            label,
            size_tokens[label]["demo cap"],
            ms(a.p50),
            size_tokens[label]["raised cap"],
            ms(b.p50),
            ms(b.p99),
            x(ratio(b.p50, a.p50)),
        )
    it.caption = (
        "`merged-calendar`, one request at a time; tokens = the whole prompt including the image's "
        "placeholder tokens. The demo processor's 128×128-pixel cap makes every size cost the same; the "
        "raised-cap copy is the same weights with the cap lifted."
    )
    section.tables.append(it)

    st = Table(
        [
            "checkpoint (width × layers)",
            "parameters",
            "weights on disk MiB",
            "load + warm-up to ready, s (median)",
        ]
    )
    for start in starts:
        st.add(start.label, f"{start.params / 1e6:.2f} M", f"{start.disk_mb:.1f}", f"{start.ready_s:.2f}")
    st.caption = (
        "In-process `WorkerService` start: load the processor and weights, hash the weights, one warm-up "
        f"generation; median of {ctx.pick(START_REPEATS, 1)} start-ups, checkpoints in rotating order."
    )
    if stack is not None:
        st.caption += (
            " A whole `mole` process adds the interpreter and torch import: in scenario 4, with all four "
            "started at once on this machine, spawn → ready took "
            + ", ".join(
                f"{p.name} {p.ready_after_s:.1f} s" for p in stack.services if p.ready_after_s is not None
            )
            + "."
        )
    section.tables.append(st)

    plot = "bench_cost_growth.png"
    with figure(ctx.options.plots / plot, ncols=2, nrows=2, size=(5.2, 3.6)) as axes:
        ax = axes[0]
        ns = [s.adapters for s in steps]
        ax.plot(ns, [s.run.p50 for s in steps], "o-", label="p50")
        ax.plot(ns, [s.run.p99 for s in steps], "s--", label="p99")
        ax.set_xscale("log", base=2)
        ax.set_xticks(ns, [str(n) for n in ns])
        ax.set_ylim(bottom=0)
        ax.set_xlabel("adapters loaded on the dynamic worker")
        ax.set_ylabel("latency ms")
        ax.set_title("Latency vs adapters loaded")
        ax.grid(alpha=0.3)
        ax.legend()
        ax = axes[1]
        ax.plot(ns, [n * merged_mb for n in ns], "o-", label="N merged replicas")
        ax.plot(ns, [s.tensor_mb for s in steps], "s--", label="one dynamic worker")
        ax.set_xscale("log", base=2)
        ax.set_xticks(ns, [str(n) for n in ns])
        ax.set_xlabel("adapters served")
        ax.set_ylabel("tensor memory MiB")
        ax.set_title("Memory: merged replicas vs dynamic")
        ax.grid(alpha=0.3)
        ax.legend()
        ax = axes[2]
        labels = list(size_runs)
        for name, style in (("demo cap", "o-"), ("raised cap", "s--")):
            ax.plot(
                range(len(labels)), [size_runs[lb][name].p50 for lb in labels], style, label=f"{name} (p50)"
            )
        ax.set_xticks(range(len(labels)), labels)
        ax.set_ylim(bottom=0)
        ax.set_xlabel("image size (px)")
        ax.set_ylabel("latency ms")
        ax.set_title("Latency vs image size")
        ax.grid(alpha=0.3)
        ax.legend()
        ax = axes[3]
        ax.plot([start.disk_mb for start in starts], [start.ready_s for start in starts], "o-")
        ax.set_xscale("log")
        ax.set_xlabel("weights on disk MiB")
        ax.set_ylabel("load + warm-up s")
        ax.set_title("Start-up vs checkpoint size")
        ax.grid(alpha=0.3)
    section.plots.append(plot)

    growth = ratio(steps[-1].run.p50, first.run.p50)
    flat = growth <= FLAT
    note = ""
    if not flat:
        note = (
            f"p50 grew {x(growth)} from 1 to {steps[-1].adapters} adapters (limit {FLAT:g}×). The measurement "
            "is one request at a time on a shared machine, so part of this can be load drift (see the load "
            "average); PEFT only runs the adapters present in a batch, so no per-adapter cost is expected."
        )
    section.checks.append(
        Check(
            f"dynamic latency flat as adapters grow 1 → {steps[-1].adapters} (within {FLAT:g}×)",
            f"p50 {x(growth)}; tensor memory {first.tensor_mb:.2f} → {steps[-1].tensor_mb:.2f} MiB "
            f"(+{lora_mb * 1024:.0f} KiB per LoRA); {steps[-1].adapters} merged replicas would hold "
            f"{steps[-1].adapters * merged_mb:.1f} MiB",
            "met" if flat else "missed",
            note,
        )
    )
    return section
