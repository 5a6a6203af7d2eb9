"""What a worker's engine requires of the adapters it serves (``WorkerSpec.engine``).

``hf`` (mole's worker, transformers + PEFT) serves any PEFT LoRA. ``vllm`` (a vLLM OpenAI server)
is sized at start-up: ``--max-loras`` (adapters in one batch) and ``--max-lora-rank``, which must be
one of :data:`VLLM_LORA_RANKS` and at least every adapter's rank; vLLM loads no DoRA adapter and no
adapter that trains whole modules (``modules_to_save``). These read the adapters' folders, so they
run where the files are (``load_mapping(check_paths=True)``, ``mole up``), not on every load.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from shared.mapping.schema import MoleMapping, WorkerSpec

VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's LoRAConfig.max_lora_rank choices


@dataclass(frozen=True)
class LoraShape:
    """What vLLM needs to know of one PEFT adapter folder."""

    rank: int  # the largest rank (r, or any rank_pattern entry)
    dora: bool  # use_dora
    modules_to_save: bool  # trains whole modules besides the LoRA pairs


def lora_shape(folder: str | Path) -> LoraShape:
    """Read ``adapter_config.json``; ``ValueError`` naming the file when it is missing or unreadable."""
    path = Path(folder) / "adapter_config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read {path}: {exc}") from None
    ranks = [int(config.get("r") or 0), *(int(r) for r in (config.get("rank_pattern") or {}).values())]
    return LoraShape(max(ranks), bool(config.get("use_dora")), bool(config.get("modules_to_save")))


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


def vllm_loras(m: MoleMapping, worker: WorkerSpec) -> VllmLoras:
    """The LoRA settings of a dynamic vLLM worker; ``ValueError`` naming the adapter vLLM cannot
    serve (see :func:`vllm_problems`)."""
    modules = m.adapters_on(worker.id, discover=False)
    ranks = [1]
    for name, folder in modules.items():
        shape = lora_shape(folder)
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
    return VllmLoras(modules, max_loras=max(1, len(modules)), max_lora_rank=rank)


def vllm_problems(m: MoleMapping) -> list[str]:
    """One message per dynamic vLLM worker that vLLM could not start with its adapters."""
    problems = []
    for i, w in enumerate(m.workers):
        if w.engine == "vllm" and w.mode == "dynamic":
            try:
                vllm_loras(m, w)
            except ValueError as exc:
                problems.append(f'workers[{i}] "{w.id}": {exc}')
    return problems
