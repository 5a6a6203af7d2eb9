"""The merge pipeline: base + LoRA → a standalone checkpoint, published only when it passes parity.

Steps:

1. **Plan** (headers only): the dtype to write (default: the base's own, from ``config.json``),
   the device, and the memory both phases need, logged before anything is loaded and recorded in
   ``merge_metadata.json`` (:func:`memory_need`).
2. **Streaming merge** (:mod:`mole.stream_merge`) into ``<out>.staging``: shard by shard, tensor by
   tensor, ``W + scale · B @ A`` in float32 cast to the written dtype; a non-finite merged weight
   is refused (PEFT's ``safe_merge`` check). Every non-weight file of the base is copied
   (tokenizer, processor and video-processor configs, chat template, ...); ``config.json`` records
   the written dtype.
3. **Parity gate** on the artifact that is published, loaded back from the staging folder as a
   merged worker loads it, in the dtype it is written in (= served in). Three models run one after
   the other on the probe set, only their outputs kept: the unmerged adapter in float32 (the
   reference), the unmerged adapter in the written dtype (what a dynamic worker serves), and the
   merged checkpoint (:func:`measure_parity`). The merged model must be about as close to the
   reference as the dynamic worker is (:class:`ParityLimits`). In float32 the dynamic worker *is*
   the reference, so the gate is the strict one: logits within 1e-3, every greedy output equal.
4. **Publish**: world-readable, swapped in atomically, the previous version kept in ``<out>.prev``
   for :func:`rollback` (unless ``keep_previous=False``).
"""

from __future__ import annotations

import gc
import json
import logging
import math
import resource
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from mole import synthetic
from mole.stream_merge import MergePlan, MergeRefused, base_dtype, plan_merge, stream_merge
from shared.checkpoints import METADATA_FILE, load_model, load_processor, processor_hash, weights_hash
from shared.modeling import GenerationParams, generate, next_token_logits, render_prompt

logger = logging.getLogger(__name__)
GIB = 1 << 30


class ParityError(RuntimeError):
    """The merge was refused (unsupported adapter, non-finite weights, or the merged checkpoint does
    not reproduce the unmerged adapter); nothing was published."""

    def __init__(self, message: str, parity: dict[str, Any] | None = None):
        super().__init__(message)
        self.parity = parity or {}


@dataclass(frozen=True)
class ParityLimits:
    """What the merged checkpoint, served in dtype D, must achieve on the probe set.

    Measured against the float32 unmerged adapter (the reference), and relative to the unmerged
    adapter served in D (what a dynamic worker answers):

    - logits: ``max|merged_D - ref| <= max(max_logit_diff, logit_ratio * max|dynamic_D - ref|)``.
      The merged weight ``W + ΔW`` is rounded to D once, an error of the same size as the rounding
      of activations that both paths incur, so its drift may be up to ``logit_ratio`` (2) times the
      dynamic worker's; ``max_logit_diff`` is the floor (and the whole limit in float32, where the
      dynamic worker's drift is 0).
    - first-token top-1 and greedy outputs: the merged model may disagree with the reference on at
      most ``extra_mismatches`` more probes than the dynamic worker does. Default (None): 0 in
      float32, where every output must be equal; in half precision one probe in 8 (rounded up),
      since a near-tie the dynamic worker happens to get right can flip either way.
    """

    max_logit_diff: float = 1e-3  # absolute floor on any first-token logit difference
    logit_ratio: float = 2.0  # the merged model's drift may be this many times the dynamic worker's
    extra_mismatches: int | None = None  # None: 0 in float32, ceil(probes / 8) in half precision

    def slack(self, probes: int, dtype: str) -> int:
        if self.extra_mismatches is not None:
            return self.extra_mismatches
        return 0 if dtype == "float32" else math.ceil(probes / 8)


@dataclass(frozen=True)
class Probe:
    image: Any
    prompt: str


@dataclass(frozen=True)
class Answers:
    """One model's outputs on the probe set: first-token logits (float32) and greedy texts."""

    logits: Any
    texts: list[str]


def default_probes(n: int = 8) -> list[Probe]:
    """The golden set: synthetic screenshots with varied prompts (no files needed)."""
    return [Probe(s.image, s.prompt) for s in synthetic.make_samples(n, seed=1234)]


def default_device() -> str:
    """cuda when available, else cpu."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _answers(model: Any, processor: Any, probes: Sequence[Probe], max_new_tokens: int) -> Answers:
    """Answer the probes one at a time: activations of one probe at a time (the prefill of a batch
    of 8 real-vocabulary probes costs more than the tiny models' weights), and no padding effects."""
    import torch

    logits, texts = [], []
    for p in probes:
        text = [render_prompt(processor, p.prompt)]
        logits.append(next_token_logits(model, processor, [p.image], text).cpu())
        out = generate(model, processor, [p.image], text, GenerationParams(max_new_tokens=max_new_tokens))
        texts.append(out[0].text)
    return Answers(torch.cat(logits), texts)


def _run(load: Callable[[], Any], processor: Any, probes: Sequence[Probe], max_new_tokens: int) -> Answers:
    """Load a model, answer the probes, free the model: one model in memory at a time."""
    import torch

    model = load()
    try:
        return _answers(model, processor, probes, max_new_tokens)
    finally:
        del model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def adapter_touches_vision(adapter: Path) -> list[str]:
    """Names of adapter tensors that modify the vision tower (``visual.*``)."""
    from safetensors import safe_open

    path = adapter / "adapter_model.safetensors"
    if not path.exists():
        return []
    with safe_open(str(path), framework="pt") as fh:
        return [k for k in fh.keys() if ".visual." in k or k.startswith("visual.")]


def compare(a: Answers, b: Answers) -> dict[str, Any]:
    """How far ``a`` is from ``b``: max first-token logit difference, top-1 and greedy agreement."""
    n = len(a.texts)
    top1 = int((a.logits.argmax(-1) == b.logits.argmax(-1)).sum().item())
    greedy = sum(x == y for x, y in zip(a.texts, b.texts, strict=True))
    return {
        "max_abs_logit_diff": (a.logits - b.logits).abs().max().item(),
        "top1_agreement": top1 / n,
        "greedy_exact_match": greedy / n,
        "top1_mismatches": n - top1,
        "greedy_mismatches": n - greedy,
    }


def measure_parity(
    base: Path,
    adapter: Path,
    merged: Path,
    probes: Sequence[Probe],
    *,
    dtype: str,
    device: str,
    max_new_tokens: int = 16,
) -> dict[str, Any]:
    """Answer the probes with the float32 unmerged adapter (reference), the unmerged adapter in
    ``dtype`` (a dynamic worker) and the checkpoint at ``merged`` loaded as a merged worker loads
    it, one model at a time; returns the figures :func:`check_parity` judges.

    Top-level figures compare the merged model with the dynamic worker (what a client could see
    differ between the two); ``merged_vs_reference`` and ``dynamic_vs_reference`` are what the
    gate judges."""
    import torch
    from peft import PeftModel

    processor = load_processor(base)

    def unmerged(run_dtype: str) -> Any:
        return PeftModel.from_pretrained(load_model(base, device=device, dtype=run_dtype), str(adapter))

    ref = _run(lambda: unmerged("float32"), processor, probes, max_new_tokens)
    if not torch.isfinite(ref.logits).all():
        raise ParityError(f"adapter {adapter} produces non-finite logits; refusing to merge")
    dynamic = ref if dtype == "float32" else _run(lambda: unmerged(dtype), processor, probes, max_new_tokens)
    served = _run(
        lambda: load_model(merged, device=device, dtype=dtype), load_processor(merged), probes, max_new_tokens
    )
    return {
        "probes": len(probes),
        "dtype": dtype,
        "device": device,
        **compare(served, dynamic),
        "merged_vs_reference": compare(served, ref),
        "dynamic_vs_reference": compare(dynamic, ref),
        "mismatches": [
            {"probe": i, "unmerged": a, "merged": b}
            for i, (a, b) in enumerate(zip(dynamic.texts, served.texts, strict=True))
            if a != b
        ][:5],
    }


def allowed(figures: dict[str, Any], limits: ParityLimits) -> dict[str, Any]:
    """The limits in force for these figures (see :class:`ParityLimits`)."""
    dyn = figures["dynamic_vs_reference"]
    slack = limits.slack(figures["probes"], figures["dtype"])
    return {
        "max_abs_logit_diff": max(limits.max_logit_diff, limits.logit_ratio * dyn["max_abs_logit_diff"]),
        "top1_mismatches": dyn["top1_mismatches"] + slack,
        "greedy_mismatches": dyn["greedy_mismatches"] + slack,
    }


def check_parity(figures: dict[str, Any], limits: ParityLimits) -> list[str]:
    """The limits ``figures`` break (empty when the merge may be published)."""
    got, bound = figures["merged_vs_reference"], allowed(figures, limits)
    dyn, dtype = figures["dynamic_vs_reference"], figures["dtype"]
    failures = []
    if not got["max_abs_logit_diff"] <= bound["max_abs_logit_diff"]:
        failures.append(
            f"max logit diff to the float32 reference {got['max_abs_logit_diff']:.3g} > "
            f"{bound['max_abs_logit_diff']:.3g} (the unmerged adapter in {dtype}: "
            f"{dyn['max_abs_logit_diff']:.3g})"
        )
    for what, key in (("top-1 tokens", "top1_mismatches"), ("greedy outputs", "greedy_mismatches")):
        if got[key] > bound[key]:
            failures.append(
                f"{what} differ from the float32 reference on {got[key]} of {figures['probes']} probes, "
                f"more than the {bound[key]} allowed (the unmerged adapter in {dtype}: {dyn[key]})"
            )
    return failures


def memory_need(plan: MergePlan, device: str) -> dict[str, Any]:
    """What each phase needs, from the checkpoint headers (nothing loaded):

    - streaming merge (host RAM; the float32 delta work on ``device``): the adapter in float32
      plus the largest tensor's working set (bytes read + its float32 copy + bytes written);
    - parity gate (on ``device``): one model at a time, the largest being the float32 reference
      (4 bytes x parameters) with the adapter; plus one probe's activations. Host RAM: the
      checkpoint's files mapped while loading (parameters x the base's bytes per parameter), plus
      the model itself on cpu (on an accelerator ``load_model`` places the weights straight there).
    """
    base_bytes = {"float32": 4, "bfloat16": 2, "float16": 2}[plan.base_dtype]
    model_fp32 = 4 * plan.params + plan.adapter_bytes
    parity_host = (model_fp32 if device == "cpu" else 0) + base_bytes * plan.params
    return {
        "device": device,
        "params": plan.params,
        "merged_bytes": plan.out_bytes,
        "stream_peak_bytes": plan.peak_bytes,
        "stream_largest_tensor": plan.largest_tensor,
        "parity_model_bytes": model_fp32,
        "parity_host_bytes": parity_host,
        "basis": (
            "stream: adapter (float32) + largest tensor's bytes read + float32 copy + bytes written; "
            "parity: one model at a time, the float32 unmerged reference the largest "
            "(4 B x params + adapter), plus one probe's activations; host RAM: the checkpoint's mapped "
            "files (params x base bytes) while loading, plus that model when the device is cpu"
        ),
    }


def _size(nbytes: int) -> str:
    return f"{nbytes / GIB:.2f} GiB" if nbytes >= GIB // 10 else f"{nbytes / (1 << 20):.1f} MiB"


def describe_need(need: dict[str, Any]) -> str:
    return (
        f"streaming merge ≈ {_size(need['stream_peak_bytes'])} host RAM "
        f"(largest tensor {need['stream_largest_tensor']}); parity gate ≈ "
        f"{_size(need['parity_model_bytes'])} on {need['device']} (float32 reference, one model "
        f"at a time) and ≈ {_size(need['parity_host_bytes'])} host RAM; writes {_size(need['merged_bytes'])}"
    )


def peak_rss_bytes() -> int:
    """This process's peak resident set size so far (``ru_maxrss``: KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


def write_config(base: Path, staging: Path, dtype: str) -> None:
    """The base's ``config.json`` as it is (a merged folder loads like its base), recording the
    written dtype where the base records its own."""
    config = json.loads((base / "config.json").read_text())
    for section in (config, config.get("text_config")):
        if isinstance(section, dict):
            for key in ("dtype", "torch_dtype"):
                if key in section:
                    section[key] = dtype
    if "dtype" not in config and "torch_dtype" not in config:
        config["dtype"] = dtype
    (staging / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def merge_adapter(
    base: str | Path,
    adapter: str | Path,
    out: str | Path,
    *,
    dtype: str | None = None,
    device: str | None = None,
    limits: ParityLimits | None = None,
    probes: Sequence[Probe] | None = None,
    keep_previous: bool = True,
) -> dict[str, Any]:
    """Merge ``adapter`` into ``base`` and publish it at ``out``; returns the manifest.

    ``dtype``: written and checked dtype (default: the base's). ``device``: where the delta math
    and the parity gate run (default: cuda when available). Raises :class:`ParityError` (and
    publishes nothing) when the adapter cannot be merged or the merged checkpoint disagrees with
    the unmerged adapter beyond ``limits``. The previous ``out`` is kept as ``<out>.prev`` unless
    ``keep_previous`` is False.
    """
    base, adapter, out = Path(base).resolve(), Path(adapter).resolve(), Path(out).resolve()
    limits = limits or ParityLimits()
    probes = list(probes) if probes is not None else default_probes()
    dtype = dtype or base_dtype(base)
    device = device or default_device()
    t0 = time.perf_counter()
    vision = adapter_touches_vision(adapter)
    if vision:
        logger.warning(
            "ADAPTER %s MODIFIES THE VISION TOWER (%d visual.* tensors): merged and unmerged image "
            "features differ from the base; the parity gate below is the only check on them",
            adapter,
            len(vision),
        )
    staging = out.with_name(out.name + ".staging")
    if staging.exists():
        shutil.rmtree(staging)
    try:
        try:
            plan = plan_merge(base, adapter, dtype)
            need = memory_need(plan, device)
            logger.info("merge of %s in %s on %s needs: %s", adapter.name, dtype, device, describe_need(need))
            stream_merge(base, adapter, staging, dtype=dtype, device=device)
        except MergeRefused as exc:
            raise ParityError(f"merge of {adapter.name} refused: {exc}") from exc
        need["stream_measured_peak_rss_bytes"] = peak_rss_bytes()
        write_config(base, staging, dtype)
        copy_non_weight_files(base, staging)
        t_merge = time.perf_counter() - t0
        figures = measure_parity(base, adapter, staging, probes, dtype=dtype, device=device)
        need["measured_peak_rss_bytes"] = peak_rss_bytes()
        failures = check_parity(figures, limits)
        figures["limits"] = asdict(limits)
        figures["allowed"] = allowed(figures, limits)
        figures["passed"] = not failures
        if failures:
            raise ParityError(f"merge of {adapter.name} refused: " + "; ".join(failures), figures)
        manifest = {
            "base": {"path": str(base), "sha256": weights_hash(base), "dtype": plan.base_dtype},
            "adapter": {"path": str(adapter), "sha256": weights_hash(adapter), "targets": plan.targets},
            "merged": {"sha256": weights_hash(staging), "dtype": dtype, "method": "streaming"},
            "processor_sha256": processor_hash(staging),
            "vision_tower_tensors": len(vision),
            "parity": figures,
            "memory": need,
            "merged_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "merge_seconds": round(t_merge, 2),
            "seconds": round(time.perf_counter() - t0, 2),
        }
        (staging / METADATA_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
        make_world_readable(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _publish(staging, out, keep_previous=keep_previous)
    logger.info(
        "merged %s into %s (%s; max logit diff to the float32 reference %.2g, allowed %.2g)",
        adapter,
        out,
        dtype,
        figures["merged_vs_reference"]["max_abs_logit_diff"],
        figures["allowed"]["max_abs_logit_diff"],
    )
    return manifest


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".safetensors.index.json", ".bin.index.json")


def copy_non_weight_files(base: Path, staging: Path) -> list[str]:
    """Copy the base's top-level files that are neither weights nor already written by the merge
    (configs, tokenizer files, chat templates, video processor config, ...); returns their names."""
    copied = []
    for path in sorted(base.iterdir()):
        if not path.is_file() or path.name.endswith(WEIGHT_SUFFIXES) or (staging / path.name).exists():
            continue
        shutil.copy2(path, staging / path.name)
        copied.append(path.name)
    return copied


def make_world_readable(root: Path) -> None:
    """Published files 0644, folders 0755, whatever the umask (safetensors writes 0600), so a
    worker running as another user can read them."""
    root.chmod(0o755)
    for path in root.rglob("*"):
        if not path.is_symlink():
            path.chmod(0o755 if path.is_dir() else 0o644)


def _previous(out: Path) -> Path:
    return out.with_name(out.name + ".prev")


def _publish(staging: Path, out: Path, *, keep_previous: bool = True) -> None:
    """Swap ``staging`` in at ``out``; the replaced version becomes ``<out>.prev`` (the older
    ``.prev`` is deleted), or is deleted too when ``keep_previous`` is False."""
    prev = _previous(out)
    if out.exists():
        if prev.exists():
            shutil.rmtree(prev)
        out.rename(prev)
    staging.rename(out)
    if not keep_previous and prev.exists():
        shutil.rmtree(prev)


def rollback(out: str | Path) -> Path:
    """Swap ``out`` with the version kept at ``<out>.prev``; the rolled-back one becomes ``.prev``."""
    out = Path(out).resolve()
    prev = _previous(out)
    if not prev.exists():
        raise FileNotFoundError(f"no previous version to roll back to: {prev} does not exist")
    tmp = out.with_name(out.name + ".rollback")
    out.rename(tmp)
    prev.rename(out)
    tmp.rename(prev)
    return out
