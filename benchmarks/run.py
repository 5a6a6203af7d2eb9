"""``mole-bench`` (also ``python -m benchmarks``): the parser (:func:`build_parser`), the console
script (:func:`main`) and the suite itself (:func:`run`).

This module imports only the standard library at import time, so ``mole-bench --help`` stays light;
the scenarios, torch and matplotlib load inside :func:`run`.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import importlib.util
import shlex
import time
import traceback
from pathlib import Path
from typing import Any

PROG = "mole-bench"  # the console script (pyproject.toml); `python -m benchmarks` runs the same

# scenario key -> module with ``async def run(ctx) -> Section`` (and, where the scenario needs
# something the suite does not install, ``def unavailable(options) -> str | None``: why it cannot run
# here); the document follows this order
SCENARIOS: dict[str, str] = {
    "merged-vs-dynamic": "benchmarks.merged_vs_dynamic",
    "batching": "benchmarks.batching",
    "mixed-adapters": "benchmarks.mixed_adapters",
    "system": "benchmarks.system",
    "overhead": "benchmarks.overhead",
    "cost-growth": "benchmarks.cost_growth",
    "router-budget": "benchmarks.router_budget",
    "label-growth": "benchmarks.label_growth",
    "engines": "benchmarks.engines",
}


def build_parser() -> argparse.ArgumentParser:
    """The ``mole-bench`` command line."""
    p = argparse.ArgumentParser(
        prog=PROG, description="run the benchmark suite and write docs/benchmarks.md with its plots"
    )
    p.add_argument("--assets", default=".cache/demo_assets", help="demo assets folder (built when missing)")
    p.add_argument("--out", default="docs/benchmarks.md", help="markdown report; PNG plots go next to it")
    p.add_argument(
        "--work", help="scratch folder (stack mapping, logs, checkpoints); default ASSETS/../bench"
    )
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (GPU mode runs bfloat16)")
    p.add_argument("--dtype", help="default: float32 on cpu, bfloat16 on cuda")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads per process on CPU (1: on a shared 2-core box more threads mostly wait)",
    )
    p.add_argument("--quick", action="store_true", help="a few requests per measurement (smoke test only)")
    p.add_argument(
        "--only",
        action="append",
        metavar="SCENARIO",
        help=f"run only these scenarios (repeat or comma-separate): {', '.join(SCENARIOS)}",
    )
    return p


def _selected(only: list[str] | None) -> list[str]:
    if not only:
        return list(SCENARIOS)
    wanted = [name.strip() for item in only for name in item.split(",") if name.strip()]
    unknown = [name for name in wanted if name not in SCENARIOS]
    if unknown:
        raise SystemExit(f"{PROG}: unknown scenario(s) {', '.join(unknown)}; known: {', '.join(SCENARIOS)}")
    return [name for name in SCENARIOS if name in wanted]


def _runnable(selected: list[str], explicit: bool, options: Any) -> tuple[list[str], dict[str, str]]:
    """The selected scenarios that can run here, and the others with the reason. A scenario asked
    for by name (``--only``) that cannot run stops the suite with that reason instead."""
    runnable, skipped = [], {}
    for key in selected:
        module = importlib.import_module(SCENARIOS[key])
        unavailable = getattr(module, "unavailable", None)
        reason = unavailable(options) if unavailable is not None else None
        if reason is None:
            runnable.append(key)
        elif explicit:
            raise SystemExit(f"{PROG}: scenario {key} cannot run: {reason}")
        else:
            skipped[key] = reason
    return runnable, skipped


def _command(args: argparse.Namespace, selected: list[str]) -> str:
    """The command line that reproduces this run (flags spelled out)."""
    parts = [PROG, "--assets", str(args.assets), "--out", str(args.out), "--device", args.device]
    if args.dtype:
        parts += ["--dtype", args.dtype]
    if not args.device.startswith("cuda"):
        parts += ["--threads", str(args.threads)]
    if args.work:
        parts += ["--work", str(args.work)]
    if args.quick:
        parts.append("--quick")
    if selected != list(SCENARIOS):
        parts += ["--only", ",".join(selected)]
    return shlex.join(parts)


def main(argv: list[str] | None = None) -> int:
    """The ``mole-bench`` console script: parse ``argv``, configure logging, :func:`run`."""
    from shared.logging import configure_logging
    from shared.settings import Settings

    args = build_parser().parse_args(argv)
    configure_logging(Settings())
    return run(args)


def run(args: argparse.Namespace) -> int:
    """Build or reuse the demo assets, run the selected scenarios, write the report. Returns 0, or 1
    when a scenario failed (its error is written into the report)."""
    import torch

    from benchmarks.core import loadavg, machine_facts
    from benchmarks.env import BenchContext, Options, describe_model
    from benchmarks.report import render
    from mole.demo_assets import build_demo_assets

    selected = _selected(args.only)
    if importlib.util.find_spec("matplotlib") is None:  # fail before minutes of measuring, not after
        raise SystemExit(f"{PROG}: the plots need matplotlib (pip install 'matplotlib>=3.9')")
    device = args.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"{PROG}: --device cuda asked for, but torch sees no CUDA device")
    dtype = args.dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    assets = Path(args.assets).resolve()
    out = Path(args.out).resolve()
    options = Options(
        assets=assets,
        work=Path(args.work).resolve() if args.work else assets.parent / "bench",
        out=out,
        device=device,
        dtype=dtype,
        threads=args.threads,
        quick=args.quick,
    )
    runnable, skipped = _runnable(selected, bool(args.only), options)
    threads_before = torch.get_num_threads()
    if not device.startswith("cuda"):
        torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    load_start = loadavg()
    print(f"{PROG}: demo assets in {assets}", flush=True)
    build_demo_assets(assets, log=lambda msg: print(f"  {msg}", flush=True))
    ctx = BenchContext(options)
    for key, reason in skipped.items():
        print(f"{PROG}: {key} skipped: {reason}", flush=True)
    sections = []
    failures: dict[str, str] = {}

    async def main() -> None:
        for key in runnable:
            module = importlib.import_module(SCENARIOS[key])
            print(f"{PROG}: {key} ...", flush=True)
            before, t0 = loadavg(), time.perf_counter()
            try:
                section = await module.run(ctx)
            except Exception as exc:
                while isinstance(exc, ExceptionGroup) and exc.exceptions:  # a load generator's client
                    exc = exc.exceptions[0]
                failures[key] = f"{type(exc).__name__}: {exc}"
                print(f"{PROG}: {key} FAILED\n{traceback.format_exc()}", flush=True)
                continue
            section.seconds = time.perf_counter() - t0
            section.load_before, section.load_after = before, loadavg()
            sections.append(section)
            for check in section.checks:
                print(f"  [{check.verdict}] {check.target}: {check.measured}", flush=True)
            print(f"  ({section.seconds:.0f} s, load {section.load_after[0]:.2f})", flush=True)

    try:
        asyncio.run(main())
    finally:
        ctx.close()
        torch.set_num_threads(threads_before)
    seconds = time.perf_counter() - t_start
    text = render(
        command=_command(args, selected),
        machine={
            **machine_facts(device),
            "device / dtype": f"{device} / {dtype}",
            "torch threads per process": "n/a (GPU)" if device.startswith("cuda") else str(args.threads),
        },
        settings=describe_settings(ctx),
        model=describe_model(ctx),
        sections=sections,
        failures=failures,
        skipped=skipped,
        seconds=seconds,
        load_start=load_start,
        load_end=loadavg(),
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"{PROG}: wrote {out} in {seconds:.0f} s", flush=True)
    return 1 if failures else 0


def describe_settings(ctx: Any) -> dict[str, str]:
    """The serving settings every scenario uses unless its section says otherwise."""
    s = ctx.settings()
    return {
        "worker batching": f"max batch {s.max_batch_size}, window {s.max_wait_ms:g} ms, queue {s.max_queue}",
        "generation": "greedy, max_new_tokens 16 (the demo experts stop after 6-8 tokens)",
        "inputs": "synthetic app screenshots (mole.synthetic), 128×96 px PNG, base64 on the wire",
        "workers in scenarios 1-3 and 6": "real in-process `WorkerService` (no HTTP layer)",
        "scenarios 4-5": "real `mole coordinator` + `mole worker` processes over loopback HTTP",
        "scenario 9": "real `mole worker` and vLLM OpenAI server processes, each engine behind its own "
        "`mole coordinator`, over loopback HTTP",
    }
