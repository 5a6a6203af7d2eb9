"""Recording adapter probes (``mole probe-adapters``; ``mole up`` before it starts vLLM workers):
each adapter's HF + PEFT answer to the fixed probe of :mod:`shared.adapter_probe`, with every
answer token's log-probability under the adapter and under the base model, written next to the
adapter as ``mole_probe.json``. The coordinator checks what a vLLM worker serves against it.

One base model is loaded for all the adapters of a base (each LoRA added, probed, then removed).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from shared.adapter_probe import (
    PROBE_PROMPT,
    PROBE_SIZE,
    PROBE_TOKENS,
    ProbeRecord,
    probe_image,
    read_record,
    write_record,
)
from shared.mapping import MoleMapping
from shared.modeling import build_messages

logger = logging.getLogger(__name__)


def missing_probes(mapping: MoleMapping, *, vllm_only: bool = True, recorded: bool = False) -> dict[str, str]:
    """Adapter name -> LoRA folder for the adapters without a readable probe record (with
    ``vllm_only``, those a vLLM worker serves; with ``recorded``, those with a record too)."""
    names: set[str] = set()
    for w in mapping.workers:
        if not vllm_only or w.engine == "vllm":
            names.update(w.adapters)
    folders = {n: mapping.adapters[n].lora for n in sorted(names) if n in mapping.adapters}
    if recorded:
        return folders
    out = {}
    for name, folder in folders.items():
        try:
            if read_record(folder) is None:
                out[name] = folder
        except ValueError:
            out[name] = folder  # unreadable: record it again
    return out


def record_probes(
    base_model: str, folders: Iterable[str], *, device: str = "cpu", dtype: str = "float32"
) -> list[Path]:
    """Record the probe of every adapter folder on ``base_model``; the written files."""
    import torch
    from peft import PeftModel

    from shared.checkpoints import load_model, load_processor

    folders = list(folders)
    if not folders:
        return []
    processor = load_processor(base_model)
    base = load_model(base_model, device=device, dtype=dtype)
    written = []
    model: Any = None
    for i, folder in enumerate(folders):
        name = f"probe{i}"
        if model is None:
            model = PeftModel.from_pretrained(base, folder, adapter_name=name)
        else:
            model.load_adapter(folder, adapter_name=name)
        model.set_adapter(name)
        model.eval()
        with torch.inference_mode():
            record = _record(model, processor, device, dtype)
        written.append(write_record(folder, record))
        model.delete_adapter(name)
        logger.info("adapter probe recorded", extra={"adapter": folder, "answer": record.answer})
    return written


def _record(model: Any, processor: Any, device: str, dtype: str) -> ProbeRecord:
    """The probe's answer under the adapter in force, kept as long as each of its starts renders
    back to its own tokens (what the engine will be sent), and its tokens' log-probabilities."""
    import torch

    image = probe_image()
    tokenizer = processor.tokenizer

    def encode(start: str | None) -> dict[str, Any]:
        text = processor.apply_chat_template(
            build_messages(PROBE_PROMPT, answer=start),
            add_generation_prompt=start is None,
            continue_final_message=start is not None,
            tokenize=False,
        )
        batch = processor(text=[text], images=[image], return_tensors="pt", size=PROBE_SIZE)
        return {k: v.to(device) for k, v in batch.items()}

    inputs = encode(None)
    prompt_ids = inputs["input_ids"][0].tolist()
    out = model.generate(**inputs, max_new_tokens=PROBE_TOKENS, do_sample=False)
    special = set(tokenizer.all_special_ids)
    answer_ids: list[int] = []
    for token in out[0, len(prompt_ids) :].tolist():
        if token in special:
            break
        answer_ids.append(token)
    starts = [""]
    batch = inputs
    for k in range(1, len(answer_ids) + 1):  # keep the answer while its starts render back
        text = tokenizer.decode(answer_ids[:k])
        encoded = encode(text)
        if encoded["input_ids"][0].tolist() != prompt_ids + answer_ids[:k]:
            answer_ids = answer_ids[: k - 1]
            break
        starts.append(text)
        batch = encoded
    if not answer_ids:
        raise ValueError("the adapter's answer to the probe is empty or does not render back to its tokens")
    starts = starts[: len(answer_ids)]
    n = len(prompt_ids)

    def logprobs() -> list[float]:
        logits = model(**batch).logits[0].float()
        lp = torch.log_softmax(logits[n - 1 : n - 1 + len(answer_ids)], dim=-1)
        return [float(lp[j, t]) for j, t in enumerate(answer_ids)]

    adapter = logprobs()
    with model.disable_adapter():
        base = logprobs()
    return ProbeRecord(
        prompt=PROBE_PROMPT,
        answer=tokenizer.decode(answer_ids),
        prompt_ids=prompt_ids,
        answer_ids=answer_ids,
        starts=starts,
        adapter_logprobs=adapter,
        base_logprobs=base,
        dtype=dtype,
        device=device,
    )
