"""What a worker's engine requires of the adapters it serves (``WorkerSpec.engine``).

``hf`` (mole's worker, transformers + PEFT) serves any PEFT LoRA. ``vllm`` (a vLLM OpenAI server)
is sized at start-up: ``--max-loras`` (adapters in one batch) and ``--max-lora-rank``, which must be
one of :data:`VLLM_LORA_RANKS` and at least every adapter's rank; vLLM loads no DoRA adapter and no
adapter that trains whole modules (``modules_to_save``), and it loads LoRA weights on the vision
tower (``visual.*``) without applying them: an adapter with only those is refused, one with some
is warned about (:func:`vllm_findings`). These read the adapters' folders, so they
run where the files are (``load_mapping(check_paths=True)``, ``mole up``), not on every load.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from shared.mapping.schema import ROUTER_MODEL_NAME, MoleMapping, WorkerSpec

VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's LoRAConfig.max_lora_rank choices


@dataclass(frozen=True)
class LoraShape:
    """What vLLM needs to know of one PEFT adapter folder."""

    rank: int  # the largest rank (r, or any rank_pattern entry)
    dora: bool  # use_dora
    modules_to_save: bool  # trains whole modules besides the LoRA pairs
    visual: int = 0  # LoRA tensors on the vision tower (``visual.*``), which vLLM loads and ignores
    language: int = 0  # LoRA tensors elsewhere (the language model)


def lora_shape(folder: str | Path) -> LoraShape:
    """Read ``adapter_config.json``; ``ValueError`` naming the file when it is missing or unreadable."""
    path = Path(folder) / "adapter_config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read {path}: {exc}") from None
    ranks = [int(config.get("r") or 0), *(int(r) for r in (config.get("rank_pattern") or {}).values())]
    names = _tensor_names(Path(folder) / "adapter_model.safetensors")
    visual = sum(1 for n in names if ".visual." in f".{n}")
    return LoraShape(
        max(ranks),
        bool(config.get("use_dora")),
        bool(config.get("modules_to_save")),
        visual=visual,
        language=len(names) - visual,
    )


def _tensor_names(path: Path) -> list[str]:
    """The tensor names of a safetensors file, from its JSON header (no weights read); [] when the
    adapter keeps its weights in another format."""
    try:
        with path.open("rb") as f:
            size = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(size)) if 0 < size < 100_000_000 else {}
    except (OSError, ValueError):
        return []
    return [name for name in header if name != "__metadata__"]


def vllm_rank(rank: int) -> int | None:
    """The smallest ``--max-lora-rank`` that admits ``rank`` (None: above vLLM's largest)."""
    return next((r for r in VLLM_LORA_RANKS if r >= rank), None)


@dataclass(frozen=True)
class VllmLoras:
    """A dynamic vLLM worker's LoRA modules and limits (``--lora-modules``, ``--max-loras``,
    ``--max-lora-rank``)."""

    modules: dict[str, str]  # adapter name -> folder
    max_loras: int
    max_lora_rank: int
    warnings: list[str]  # adapters it serves but vLLM applies only in part (vision-tower weights)


def vllm_loras(m: MoleMapping, worker: WorkerSpec) -> VllmLoras:
    """The LoRA settings of a dynamic vLLM worker (with the router LoRA when it serves the router);
    ``ValueError`` naming the adapter vLLM cannot serve (see :func:`vllm_findings`)."""
    modules = m.adapters_on(worker.id, discover=False)
    if m.router.served_by == worker.id:  # the router LoRA too, under its own name
        modules[ROUTER_MODEL_NAME] = m.router.adapter
    ranks = [1]
    warnings = []
    for name, folder in modules.items():
        shape = lora_shape(folder)
        if shape.visual and shape.language:
            warnings.append(
                f'adapter "{name}" has {shape.visual} LoRA tensors on the vision tower (visual.*), which vLLM ignores'
            )
        if shape.visual and not shape.language:
            raise ValueError(
                f'adapter "{name}" has LoRA weights on the vision tower (visual.*) only: vLLM loads '
                "them without applying them, so it would answer as the base model"
            )
        if shape.dora or shape.modules_to_save:
            what = "a DoRA adapter" if shape.dora else "an adapter with modules_to_save"
            raise ValueError(f'adapter "{name}" is {what}, which vLLM does not load')
        if vllm_rank(shape.rank) is None:
            raise ValueError(
                f'adapter "{name}" has rank {shape.rank}; vLLM serves ranks up to {VLLM_LORA_RANKS[-1]}'
            )
        ranks.append(shape.rank)
    rank = vllm_rank(max(ranks))
    assert rank is not None
    return VllmLoras(modules, max_loras=max(1, len(modules)), max_lora_rank=rank, warnings=warnings)


def vllm_image_size(
    model: str | Path, max_pixels: int | None, min_pixels: int | None, *, always: bool = False
) -> dict[str, int] | None:
    """The image processor's ``size`` for vLLM (``mm_processor_kwargs``) at a pixel budget, as
    mole's workers resize (``shared.modeling.image_size``): the checkpoint's own budget
    (``preprocessor_config.json``) lowered to ``max_pixels``, its floor set to ``min_pixels``.
    None: the checkpoint's own budget, nothing to pass (or no readable budget); with ``always``, the
    size even then (a request's own size overrides a server's ``--mm-processor-kwargs``)."""
    if max_pixels is None and min_pixels is None and not always:
        return None
    try:
        own = json.loads((Path(model) / "preprocessor_config.json").read_text())["size"]
        own_high, own_low = int(own["longest_edge"]), int(own.get("shortest_edge") or 0)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    high = min(max_pixels, own_high) if max_pixels else own_high
    low = min_pixels if min_pixels is not None else own_low
    if high == own_high and low == own_low and not always:
        return None
    return {"shortest_edge": min(low, high), "longest_edge": high}


def vllm_findings(m: MoleMapping) -> tuple[list[str], list[str]]:
    """(problems, warnings) of the dynamic vLLM workers, each adapter folder read once: one problem
    per worker vLLM could not start with its adapters; one warning per adapter with vision-tower
    LoRA weights next to language ones (vLLM applies only the latter, so its answers may differ from
    the HF worker's; the coordinator's adapter check compares them)."""
    problems: list[str] = []
    warnings: list[str] = []
    for i, w in enumerate(m.workers):
        if w.engine == "vllm" and w.mode == "dynamic":
            try:
                warnings += [f'workers "{w.id}": {note}' for note in vllm_loras(m, w).warnings]
            except ValueError as exc:
                problems.append(f'workers[{i}] "{w.id}": {exc}')
    return problems, warnings
