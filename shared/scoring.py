"""Router label scoring: the log-probability of every label's full token sequence, batched.

A label is any string the tokenizer encodes (``"3"``, ``"invoice-ocr"``). :func:`score_labels`
scores every label of every row in at most two forwards: one over the prompts (their KV cache kept)
and, when some labels have several tokens, one over all (row, label) continuations of that cache.

torch is imported lazily so ``shared`` stays light for the HTTP layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from shared.modeling import encode_batch

if TYPE_CHECKING:
    import torch
    from PIL.Image import Image


def label_sequences(tokenizer: Any, labels: Sequence[str]) -> list[list[int]]:
    """The token ids of each router label (one or more per label); ``ValueError`` for a label that
    tokenizes to nothing, or two labels with the same ids."""
    seqs: list[list[int]] = []
    for label in labels:
        encoded = list(tokenizer.encode(label, add_special_tokens=False))
        if not encoded:
            raise ValueError(f"router label {label!r} has no tokens")
        if encoded in seqs:
            raise ValueError(f"router labels {labels[seqs.index(encoded)]!r} and {label!r} tokenize alike")
        seqs.append(encoded)
    return seqs


def score_labels(
    model: Any,
    processor: Any,
    images: Sequence[Image],
    texts: Sequence[str],
    labels: Sequence[Sequence[int]],
    *,
    adapter_names: Sequence[str] | None = None,
    max_pixels: int | None = None,
) -> torch.Tensor:
    """Log-probability of each label's full token sequence after each row's prompt, float32
    ``[batch, labels]``, in at most two forwards for the whole batch and every label.

    The prompt (image included) runs once, with its KV cache kept; the first token of every label
    is scored from its last position. When some labels have more tokens, ONE more forward scores
    all of them: every (row, multi-token label) pair continues the row's cache (repeated per label,
    not recomputed) with the label's tokens, and the log-probabilities of the label's later tokens
    are summed. With single-token labels only it is the one forward of :func:`next_token_logits`.
    """
    import torch

    device = str(next(model.parameters()).device)
    batch = encode_batch(processor, images, texts, device, max_pixels=max_pixels)
    n = batch["input_ids"].shape[0]
    multi = [i for i, seq in enumerate(labels) if len(seq) > 1]
    kwargs: dict[str, Any] = {}
    if adapter_names is not None:
        kwargs["adapter_names"] = list(adapter_names)
    with torch.inference_mode():
        out = model(**batch, **kwargs, use_cache=bool(multi), logits_to_keep=1)
        first = torch.log_softmax(out.logits[:, -1, :].float(), dim=-1)
        scores = first[:, [seq[0] for seq in labels]]
        if not multi:
            return scores
        cache = getattr(out, "cache", None) or out.past_key_values
        m, width = len(multi), max(len(labels[i]) for i in multi) - 1
        pad = processor.tokenizer.pad_token_id or 0
        inputs = torch.full((m, width), pad, dtype=torch.long, device=device)
        for row, i in enumerate(multi):
            inputs[row, : len(labels[i]) - 1] = torch.tensor(labels[i][:-1], device=device)
        cache.batch_repeat_interleave(m)  # row r of the batch -> rows r*m .. r*m+m-1
        mask = batch["attention_mask"]
        # positions continue each row's prompt: what generate gives its next tokens (Qwen3-VL's
        # rope_deltas place text after the image; the 4 rows are text, temporal, height, width)
        start = mask.sum(dim=1, keepdim=True) + model_rope_deltas(model, n, device)
        positions = start.repeat_interleave(m, dim=0) + torch.arange(width, device=device)
        step_kwargs = dict(kwargs)
        if adapter_names is not None:
            step_kwargs["adapter_names"] = [name for name in adapter_names for _ in range(m)]
        cont = model(
            input_ids=inputs.repeat(n, 1),
            attention_mask=torch.cat(
                [mask.repeat_interleave(m, dim=0), torch.ones(n * m, width, dtype=mask.dtype, device=device)],
                dim=1,
            ),
            position_ids=positions.unsqueeze(0).expand(4, -1, -1),
            cache=cache,
            use_cache=False,
            **step_kwargs,
        )
        logp = torch.log_softmax(cont.logits.float(), dim=-1).view(n, m, width, -1)
        for row, i in enumerate(multi):
            rest = torch.tensor(labels[i][1:], device=device)
            steps = torch.arange(len(rest), device=device)
            scores[:, i] += logp[:, row, steps, rest].sum(dim=-1)
    return scores


def model_rope_deltas(model: Any, batch: int, device: str) -> torch.Tensor:
    """Qwen-VL's per-row offset of text positions after the image, ``[batch, 1]`` (set by the
    last prefill forward; zeros for a model without one)."""
    import torch

    deltas = next(
        (m.rope_deltas for m in model.modules() if getattr(m, "rope_deltas", None) is not None), None
    )
    if deltas is None:
        return torch.zeros(batch, 1, dtype=torch.long, device=device)
    return deltas.to(device).view(batch, 1)
