"""The ``mole`` command line: one entry point composing the shared core and both services.

Each subcommand imports what it needs when it runs, so ``mole --help`` and ``mole check-config``
never load torch.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from shared.mapping import MoleMapping
    from shared.settings import Settings

logger = logging.getLogger("mole")


def _settings():  # type: ignore[no-untyped-def]
    from shared.settings import Settings

    return Settings()


def _setup_logging() -> None:
    from shared.logging import configure_logging

    configure_logging(_settings())


# ---- model assets ---------------------------------------------------------------------------
def cmd_demo_assets(args: argparse.Namespace) -> int:
    from mole.demo_assets import build_demo_assets

    report = build_demo_assets(Path(args.out), force=args.force)
    print(f"router held-out accuracy: {report.router_heldout_accuracy:.1%}")
    for name, fmt in report.expert_format_accuracy.items():
        exact = report.expert_exact_accuracy[name]
        print(f"expert {name:<10} format {fmt:6.1%}   exact {exact:6.1%}")
    print(f"mapping: {Path(args.out) / 'expert_machine_mapping.json'}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from mole.demo import run

    return run(args)


def cmd_merge(args: argparse.Namespace) -> int:
    from mole.merge import ParityError, ParityLimits, merge_adapter, rollback

    if args.rollback:
        out = rollback(args.out)
        print(f"rolled back {out} to the previous version (the replaced one is kept as {out}.prev)")
        return 0
    if not args.base or not args.adapter:
        print("mole merge: --base and --adapter are required (unless --rollback)", file=sys.stderr)
        return 2
    limits = ParityLimits(
        max_logit_diff=args.max_logit_diff,
        logit_ratio=args.logit_ratio,
        extra_mismatches=args.extra_mismatches,
    )
    try:
        manifest = merge_adapter(
            args.base,
            args.adapter,
            args.out,
            dtype=args.dtype,
            device=args.device,
            limits=limits,
            keep_previous=not args.no_keep_previous,
        )
    except ParityError as exc:
        print(f"mole merge: {exc}", file=sys.stderr)
        print(json.dumps(exc.parity, indent=2, default=str), file=sys.stderr)
        return 1
    print(f"merged -> {args.out}\n{_merge_summary(manifest)}")
    return 0


def _merge_summary(manifest: dict) -> str:
    from mole.merge import GIB, describe_need
    from shared.checkpoints import METADATA_FILE

    parity, memory = manifest["parity"], manifest["memory"]
    ref, dyn, bound = parity["merged_vs_reference"], parity["dynamic_vs_reference"], parity["allowed"]
    n = parity["probes"]
    return (
        f"  written in {parity['dtype']}, checked on {parity['device']} over {n} probes\n"
        f"  merged vs float32 reference: max logit diff {ref['max_abs_logit_diff']:.2e} "
        f"(allowed {bound['max_abs_logit_diff']:.2e}), top-1 {n - ref['top1_mismatches']}/{n}, "
        f"greedy {n - ref['greedy_mismatches']}/{n}\n"
        f"  unmerged adapter in {parity['dtype']} vs reference: max logit diff "
        f"{dyn['max_abs_logit_diff']:.2e}, top-1 {n - dyn['top1_mismatches']}/{n}, "
        f"greedy {n - dyn['greedy_mismatches']}/{n}\n"
        f"  merged vs unmerged in {parity['dtype']}: max logit diff {parity['max_abs_logit_diff']:.2e}, "
        f"greedy exact {parity['greedy_exact_match']:.0%}\n"
        f"  peak RSS {memory['measured_peak_rss_bytes'] / GIB:.2f} GiB (stated need: {describe_need(memory)}); "
        f"{manifest['seconds']:.1f} s\n"
        f"  merged sha256 {manifest['merged']['sha256'][:16]}…  metadata: {METADATA_FILE}"
    )


def cmd_deploy_adapter(args: argparse.Namespace) -> int:
    from mole.merge import ParityError, make_world_readable, merge_adapter
    from shared.checkpoints import weights_hash

    src = Path(args.checkpoint)
    if not (src / "adapter_config.json").exists():
        print(
            f"mole deploy-adapter: {src} is not a PEFT adapter folder (no adapter_config.json)",
            file=sys.stderr,
        )
        return 2
    volume = Path(args.volume)
    dest = volume / "loras" / args.name / "adapter"
    staging = dest.with_name("adapter.staging")
    if staging.exists():
        shutil.rmtree(staging)
    shutil.copytree(src, staging)
    make_world_readable(staging)
    if dest.exists():
        shutil.rmtree(dest)
    staging.rename(dest)
    meta = {
        "name": args.name,
        "source": str(src.resolve()),
        "sha256": weights_hash(dest),
        "accuracy": args.accuracy,
        "deployed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    (dest.parent / "deploy_metadata.json").write_text(json.dumps(meta, indent=2) + "\n")
    make_world_readable(dest.parent)  # loras/<name>: the adapter and its metadata
    print(f"deployed adapter {args.name!r} -> {dest}")
    if args.merge:
        if not args.base:
            print("mole deploy-adapter: --merge needs --base", file=sys.stderr)
            return 2
        try:
            manifest = merge_adapter(
                args.base,
                dest,
                volume / "merged" / args.name,
                dtype=args.dtype,
                device=args.device,
                keep_previous=not args.no_keep_previous,
            )
        except ParityError as exc:
            print(f"mole deploy-adapter: {exc}", file=sys.stderr)
            return 1
        print(f"merged -> {volume / 'merged' / args.name}\n{_merge_summary(manifest)}")
    return 0


def cmd_probe_adapters(args: argparse.Namespace) -> int:
    """Record the HF reference answer of adapters (``mole_probe.json`` in each adapter's folder)."""
    from mole.probe import missing_probes, record_probes
    from shared.errors import ConfigError
    from shared.mapping import load_mapping

    try:
        mapping = load_mapping(Path(args.config), check_paths=True)
    except ConfigError as exc:
        print(f"mole probe-adapters: {args.config}: {exc}", file=sys.stderr)
        return 2
    vllm_only = not args.all
    folders = missing_probes(mapping, vllm_only=vllm_only, recorded=args.force)
    if not folders:
        print("every adapter has its probe record")
        return 0
    from shared.settings import resolve_device_dtype

    device, dtype = resolve_device_dtype(_settings())
    for path in record_probes(mapping.base_model, folders.values(), device=device, dtype=dtype):
        print(f"recorded {path}")
    return 0


def cmd_check_config(args: argparse.Namespace) -> int:
    from shared.errors import ConfigError
    from shared.mapping import load_mapping

    try:
        mapping = load_mapping(Path(args.mapping), check_paths=args.check_paths)
    except ConfigError as exc:
        print(f"{args.mapping}: {exc}", file=sys.stderr)
        return 1
    print(mapping.format_routing_table())
    print(_router_scoring(mapping))
    print(f"\n{args.mapping}: OK ({len(mapping.adapters)} adapters, {len(mapping.workers)} workers)")
    return 0


def _router_scoring(mapping: MoleMapping) -> str:
    """What the router scores: each label's full token sequence (in the base tokenizer when the
    base model folder is here), in one forward plus one for labels of several tokens."""
    labels = mapping.router.ordered_labels()
    head = f"router: {len(labels)} labels, each scored as its full token sequence"
    if not (Path(mapping.base_model) / "config.json").is_file():
        return f"{head} (base model not here: token counts not checked)"
    from transformers import AutoTokenizer

    from shared.scoring import label_sequences

    try:
        seqs = label_sequences(AutoTokenizer.from_pretrained(mapping.base_model), labels)
    except ValueError as exc:
        return f"{head}; cannot score: {exc}"
    shortest, longest = min(len(seq) for seq in seqs), max(len(seq) for seq in seqs)
    passes = "one forward" if longest == 1 else "one forward for the prompt, one for the labels' later tokens"
    return f"{head}: {shortest} to {longest} tokens each ({passes})"


# ---- services -------------------------------------------------------------------------------
def _serve(app: object, settings: Settings, host: str, port: int) -> int:
    from shared.server import serve

    serve(app, settings, host, port)
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from shared.errors import ConfigError
    from shared.mapping import load_mapping
    from worker.app import create_app

    settings = _settings()
    try:
        mapping = load_mapping(Path(args.config))
        spec = mapping.worker(args.worker_id)
    except ConfigError as exc:  # one line, like check-config, not a traceback
        print(f"mole worker: {args.config}: {exc}", file=sys.stderr)
        return 2
    app = create_app(settings, mapping, args.worker_id)
    return _serve(app, settings, args.host or spec.host, args.port or spec.port)


def cmd_coordinator(args: argparse.Namespace) -> int:
    from coordinator.app import create_app
    from shared.errors import ConfigError
    from shared.mapping import load_mapping

    settings = _settings()
    try:  # what the lifespan would find (paths included), said in one line before serving
        mapping = load_mapping(Path(args.config), check_paths=True)
    except ConfigError as exc:
        print(f"mole coordinator: {args.config}: {exc}", file=sys.stderr)
        return 2
    if mapping.monolithic:  # router and the dynamic worker's experts on one model, in this process
        from mole.monolithic import create_monolithic_app

        app = create_monolithic_app(settings, Path(args.config))
    else:
        app = create_app(settings, Path(args.config))
    host = args.host or mapping.coordinator.host
    port = args.port or mapping.coordinator.port
    return _serve(app, settings, host, port)


def cmd_up(args: argparse.Namespace) -> int:
    from mole.up import run

    return run(args)


def run_bench(argv: list[str]) -> int:
    """``mole bench ARGS``: the benchmark suite (``python -m benchmarks ARGS``) in a process of its
    own, so that ``mole`` never imports ``benchmarks`` (benchmarks build on ``mole``, not the reverse)."""
    import subprocess

    return subprocess.call([sys.executable, "-m", "benchmarks", *argv])


def cmd_modal_deploy(args: argparse.Namespace) -> int:
    from modal_deploy.deploy import run

    return run(args)


# ---- parser ---------------------------------------------------------------------------------
def _merge_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--dtype",
        default=None,
        choices=["float32", "bfloat16", "float16"],
        help="written and parity-checked dtype (default: the base's, from its config.json)",
    )
    p.add_argument(
        "--device", default=None, help="where the merge and parity gate run (default: cuda if available)"
    )
    p.add_argument(
        "--no-keep-previous",
        action="store_true",
        help="delete the replaced merged version instead of keeping it as OUT.prev (no rollback; saves one "
        "merged checkpoint of disk)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mole", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo-assets", help="build the embedded tiny model set (cached)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--force", action="store_true", help="rebuild even when the cache is up to date")
    p.set_defaults(func=cmd_demo_assets)

    p = sub.add_parser("demo", help="build the demo assets, start the local stack, classify samples, stop")
    p.add_argument("--assets", default=".cache/demo_assets", help="demo asset folder (built when missing)")
    p.add_argument(
        "--engine",
        choices=("hf", "vllm"),
        default="hf",
        help="vllm: every worker and the router on vLLM's server (make install-vllm first)",
    )
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("merge", help="merge a LoRA into its base, gated by a parity check")
    p.add_argument("--base", help="base checkpoint folder")
    p.add_argument("--adapter", help="PEFT adapter folder")
    p.add_argument(
        "--out", required=True, help="merged checkpoint folder (previous version kept as OUT.prev)"
    )
    _merge_options(p)
    p.add_argument(
        "--max-logit-diff",
        type=float,
        default=1e-3,
        help="parity floor on first-token logit drift from the float32 reference (the whole limit in float32)",
    )
    p.add_argument(
        "--logit-ratio",
        type=float,
        default=2.0,
        help="in half precision, the merged model's drift may be this many times the unmerged adapter's",
    )
    p.add_argument(
        "--extra-mismatches",
        type=int,
        default=None,
        help="probes on which the merged model may disagree more than the unmerged adapter in the same "
        "dtype (default: 0 in float32, 1 in 8 in half precision)",
    )
    p.add_argument("--rollback", action="store_true", help="swap OUT back to OUT.prev")
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("deploy-adapter", help="copy an adapter into the volume layout, optionally merge it")
    p.add_argument("--name", required=True)
    p.add_argument("--checkpoint", required=True, help="PEFT adapter folder")
    p.add_argument("--volume", default="vol", help="volume root holding loras/ and merged/")
    p.add_argument("--accuracy", type=float, default=None, help="evaluation accuracy to record")
    p.add_argument("--merge", action="store_true", help="also build VOLUME/merged/NAME")
    p.add_argument("--base", help="base checkpoint (needed with --merge)")
    _merge_options(p)
    p.set_defaults(func=cmd_deploy_adapter)

    p = sub.add_parser(
        "probe-adapters",
        help="record each adapter's HF answer to the probe that vLLM workers are checked against",
    )
    p.add_argument("--config", required=True, help="expert_machine_mapping.json")
    p.add_argument("--all", action="store_true", help="every adapter, not only those vLLM workers serve")
    p.add_argument("--force", action="store_true", help="record again those that have a record")
    p.set_defaults(func=cmd_probe_adapters)

    p = sub.add_parser("check-config", help="validate a mapping and print the routing table")
    p.add_argument("mapping")
    p.add_argument("--check-paths", action="store_true", help="also require every model path to exist")
    p.set_defaults(func=cmd_check_config)

    p = sub.add_parser("worker", help="run one worker of a mapping")
    p.add_argument("--config", required=True, help="expert_machine_mapping.json")
    p.add_argument("--worker-id", required=True)
    p.add_argument("--host", help="default: the host of the worker's url")
    p.add_argument("--port", type=int, help="default: the port of the worker's url")
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("coordinator", help="run the coordinator of a mapping")
    p.add_argument("--config", required=True, help="expert_machine_mapping.json")
    p.add_argument("--host", help="default: the host of the coordinator's url")
    p.add_argument("--port", type=int, help="default: the port of the coordinator's url")
    p.set_defaults(func=cmd_coordinator)

    p = sub.add_parser("up", help="start the coordinator and every local worker; stop all on Ctrl-C")
    p.add_argument("--config", required=True, help="expert_machine_mapping.json")
    p.add_argument("--log-dir", help="folder for the services' logs and stack.json (default: a temp dir)")
    p.add_argument("--timeout", type=float, default=180.0, help="seconds to wait for every /health/ready")
    p.set_defaults(func=cmd_up)

    sub.add_parser(
        "bench",
        help="the benchmark suite; the same as mole-bench (mole bench --help for its options)",
        add_help=False,
    )

    p = sub.add_parser("modal-deploy", help="deploy every worker of a mapping (and the coordinator) to Modal")
    p.add_argument("--config", required=True, help="expert_machine_mapping.json")
    p.add_argument("--dry-run", action="store_true", help="print the plan and the URLs; deploy nothing")
    p.add_argument("--workspace", help="Modal workspace name, to show the endpoint URLs in --dry-run")
    p.add_argument("--skip-coordinator", action="store_true", help="deploy the workers only")
    p.add_argument("--public-coordinator", action="store_true", help="no Modal proxy auth on the coordinator")
    p.add_argument(
        "--region", help="pin every app to a Modal region, e.g. us-east (a worker's own region wins)"
    )
    p.set_defaults(func=cmd_modal_deploy)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:
        return run_bench(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    from pydantic import ValidationError

    from shared.settings import settings_error_line

    try:
        _setup_logging()
    except ValidationError as exc:  # a bad MOLE_* variable: one line, not a traceback
        print(f"mole {args.command}: settings: {settings_error_line(exc)}", file=sys.stderr)
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
