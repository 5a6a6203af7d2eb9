"""The merge pipeline: base + LoRA → a standalone checkpoint, published only when it passes parity.

Steps: load the base in float32, attach the adapter, record the unmerged model's answers on a
golden probe set, merge with PEFT's ``safe_merge`` (in float32: bf16 merges drift), record the
merged model's answers, compare (max logit difference, top-1 agreement, exact greedy output),
cast to the target dtype, save to a staging folder with every non-weight file of the base
(tokenizer, processor and video-processor configs, chat template, ...) and
``merge_metadata.json``, make it world-readable, and only then swap it in, keeping the previous
version in ``<out>.prev`` for :func:`rollback`.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from mole import synthetic
from shared.modeling import (
    METADATA_FILE,
    GenerationParams,
    generate,
    load_model,
    load_processor,
    next_token_logits,
    processor_hash,
    render_prompt,
    weights_hash,
)

logger = logging.getLogger(__name__)


class ParityError(RuntimeError):
    """The merged model does not reproduce the unmerged adapter; nothing was published."""

    def __init__(self, message: str, parity: dict[str, Any] | None = None):
        super().__init__(message)
        self.parity = parity or {}


@dataclass(frozen=True)
class ParityLimits:
    """What a merged checkpoint must match on the probe set (float32 against float32)."""

    max_logit_diff: float = 1e-3  # largest absolute difference of any first-token logit
    min_top1_agreement: float = 1.0  # share of probes whose first answer token agrees
    require_exact_greedy: bool = True  # every greedy output identical


@dataclass(frozen=True)
class Probe:
    image: Any
    prompt: str


def default_probes(n: int = 8) -> list[Probe]:
    """The golden set: synthetic screenshots with varied prompts (no files needed)."""
    return [Probe(s.image, s.prompt) for s in synthetic.make_samples(n, seed=1234)]


def _answers(
    model: Any, processor: Any, probes: Sequence[Probe], max_new_tokens: int
) -> tuple[Any, list[str]]:
    texts = [render_prompt(processor, p.prompt) for p in probes]
    images = [p.image for p in probes]
    logits = next_token_logits(model, processor, images, texts)
    outs = generate(model, processor, images, texts, GenerationParams(max_new_tokens=max_new_tokens))
    return logits, [o.text for o in outs]


def adapter_touches_vision(adapter: Path) -> list[str]:
    """Names of adapter tensors that modify the vision tower (``visual.*``)."""
    from safetensors import safe_open

    path = adapter / "adapter_model.safetensors"
    if not path.exists():
        return []
    with safe_open(str(path), framework="pt") as fh:
        return [k for k in fh.keys() if ".visual." in k or k.startswith("visual.")]


def measure_parity(
    base: Path, adapter: Path, probes: Sequence[Probe], max_new_tokens: int = 16
) -> tuple[Any, dict[str, Any]]:
    """Merge in float32 and compare against the unmerged adapter; returns (merged model, figures)."""
    import torch
    from peft import PeftModel

    processor = load_processor(base)
    model = PeftModel.from_pretrained(load_model(base, dtype="float32"), str(adapter))
    ref_logits, ref_text = _answers(model, processor, probes, max_new_tokens)
    if not torch.isfinite(ref_logits).all():
        raise ParityError(f"adapter {adapter} produces non-finite logits; refusing to merge")
    try:
        merged = model.merge_and_unload(safe_merge=True)
    except ValueError as exc:  # safe_merge found NaNs in the merged weights
        raise ParityError(f"safe merge of {adapter} failed: {exc}") from exc
    logits, text = _answers(merged, processor, probes, max_new_tokens)
    diff = (logits - ref_logits).abs().max().item()
    top1 = (logits.argmax(-1) == ref_logits.argmax(-1)).float().mean().item()
    exact = sum(a == b for a, b in zip(text, ref_text, strict=True)) / len(probes)
    figures = {
        "probes": len(probes),
        "max_abs_logit_diff": diff,
        "top1_agreement": top1,
        "greedy_exact_match": exact,
        "mismatches": [
            {"probe": i, "unmerged": a, "merged": b}
            for i, (a, b) in enumerate(zip(ref_text, text, strict=True))
            if a != b
        ][:5],
    }
    return merged, figures


def check_parity(figures: dict[str, Any], limits: ParityLimits) -> list[str]:
    """The limits ``figures`` break (empty when the merge may be published)."""
    failures = []
    if not figures["max_abs_logit_diff"] <= limits.max_logit_diff:
        failures.append(f"max logit diff {figures['max_abs_logit_diff']:.3g} > {limits.max_logit_diff:g}")
    if figures["top1_agreement"] < limits.min_top1_agreement:
        failures.append(f"top-1 agreement {figures['top1_agreement']:.1%} < {limits.min_top1_agreement:.0%}")
    if limits.require_exact_greedy and figures["greedy_exact_match"] < 1.0:
        failures.append(
            f"greedy outputs differ on {figures['probes'] - round(figures['greedy_exact_match'] * figures['probes'])} probe(s)"
        )
    return failures


def merge_adapter(
    base: str | Path,
    adapter: str | Path,
    out: str | Path,
    *,
    dtype: str = "float32",
    limits: ParityLimits | None = None,
    probes: Sequence[Probe] | None = None,
) -> dict[str, Any]:
    """Merge ``adapter`` into ``base`` and publish it at ``out``; returns the manifest.

    Raises :class:`ParityError` (and publishes nothing) when the merged model disagrees with the
    unmerged adapter beyond ``limits``. The previous ``out`` is kept as ``<out>.prev``.
    """
    from shared.modeling import resolve_dtype

    base, adapter, out = Path(base).resolve(), Path(adapter).resolve(), Path(out).resolve()
    limits = limits or ParityLimits()
    probes = list(probes) if probes is not None else default_probes()
    t0 = time.perf_counter()
    vision = adapter_touches_vision(adapter)
    if vision:
        logger.warning(
            "ADAPTER %s MODIFIES THE VISION TOWER (%d visual.* tensors): merged and unmerged image "
            "features differ from the base; the parity gate below is the only check on them",
            adapter,
            len(vision),
        )
    merged, figures = measure_parity(base, adapter, probes)
    failures = check_parity(figures, limits)
    figures["limits"] = asdict(limits)
    figures["passed"] = not failures
    if failures:
        raise ParityError(f"merge of {adapter.name} refused: " + "; ".join(failures), figures)

    staging = out.with_name(out.name + ".staging")
    if staging.exists():
        shutil.rmtree(staging)
    merged = merged.to(resolve_dtype(dtype))
    merged.save_pretrained(staging)
    copy_non_weight_files(base, staging)
    manifest = {
        "base": {"path": str(base), "sha256": weights_hash(base)},
        "adapter": {"path": str(adapter), "sha256": weights_hash(adapter)},
        "merged": {"sha256": weights_hash(staging), "dtype": dtype},
        "processor_sha256": processor_hash(staging),
        "vision_tower_tensors": len(vision),
        "parity": figures,
        "merged_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "seconds": round(time.perf_counter() - t0, 2),
    }
    (staging / METADATA_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    make_world_readable(staging)
    _publish(staging, out)
    logger.info("merged %s into %s (max logit diff %.2g)", adapter, out, figures["max_abs_logit_diff"])
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


def _publish(staging: Path, out: Path) -> None:
    prev = _previous(out)
    if out.exists():
        if prev.exists():
            shutil.rmtree(prev)
        out.rename(prev)
    staging.rename(out)


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
