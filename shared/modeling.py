"""Running a loaded Qwen3-VL: prompts and conversations, the image budget, batched generation and
first-token logits (loading a checkpoint folder is :mod:`shared.checkpoints`).

torch and transformers are imported lazily so ``shared`` stays light for the HTTP layer.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from shared.decoding import FinishReason, TokenSink
from shared.errors import InvalidInput

if TYPE_CHECKING:
    import torch
    from PIL.Image import Image

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Turn:
    """An earlier turn of a conversation, rendered through the chat template before the prompt."""

    role: str  # "system", "user" or "assistant"
    text: str


def build_messages(
    prompt: str,
    system_prompt: str | None = None,
    answer: str | None = None,
    *,
    history: Sequence[Turn] = (),
    image: bool = True,
) -> list[dict]:
    """Chat messages for one prompt: the system prompt, earlier turns, then the user turn holding
    the image (when ``image``) and the prompt (optionally followed by the answer)."""
    messages: list[dict] = []
    if system_prompt:
        messages.append({"role": "system", "content": [{"type": "text", "text": system_prompt}]})
    for turn in history:
        messages.append({"role": turn.role, "content": [{"type": "text", "text": turn.text}]})
    user: list[dict] = [{"type": "image"}] if image else []
    messages.append({"role": "user", "content": [*user, {"type": "text", "text": prompt}]})
    if answer is not None:
        messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return messages


NEUTRALISER = "\u200b"  # zero-width space put after the first character of a special token in client text


def _special_token_pattern(tokenizer: Any) -> re.Pattern[str] | None:
    """A regex matching every special token string of ``tokenizer`` (longest first), cached on it."""
    if hasattr(tokenizer, "_mole_special_pattern"):
        cached: re.Pattern[str] | None = tokenizer._mole_special_pattern
        return cached
    tokens = set(getattr(tokenizer, "all_special_tokens", []) or [])
    decoder = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    tokens |= {t.content for t in decoder.values() if getattr(t, "special", False)}
    tokens = {t for t in tokens if isinstance(t, str) and len(t) > 1}
    pattern = (
        re.compile("|".join(re.escape(t) for t in sorted(tokens, key=len, reverse=True))) if tokens else None
    )
    try:
        tokenizer._mole_special_pattern = pattern
    except AttributeError:  # a tokenizer that refuses attributes: recompute next time
        pass
    return pattern


def neutralise_special_tokens(tokenizer: Any, text: str) -> str:
    """``text`` with every special token string (``<|im_end|>``, ``<|image_pad|>``...) broken by a
    zero-width space after its first character, so the tokenizer reads it as plain text: client text
    can neither forge chat turns nor add image placeholders."""
    pattern = _special_token_pattern(tokenizer)
    if pattern is None:
        return text
    return pattern.sub(lambda m: m.group(0)[0] + NEUTRALISER + m.group(0)[1:], text)


def render_prompt(
    processor: Any,
    prompt: str,
    system_prompt: str | None = None,
    *,
    history: Sequence[Turn] = (),
    image: bool = True,
) -> str:
    """The chat-templated text of a conversation, ending where the assistant's answer starts.

    ``prompt`` and the ``history`` turns are client text: their special tokens are neutralised
    (:func:`neutralise_special_tokens`). ``system_prompt`` is used as written: callers pass the
    mapping's, or neutralise a client's first.
    """
    tokenizer = processor.tokenizer
    prompt = neutralise_special_tokens(tokenizer, prompt)
    history = [Turn(t.role, neutralise_special_tokens(tokenizer, t.text)) for t in history]
    messages = build_messages(prompt, system_prompt, history=history, image=image)
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def image_size(
    processor: Any, max_pixels: int | None, min_pixels: int | None = None
) -> dict[str, int] | None:
    """The image processor's ``size`` with its pixel budget lowered to ``max_pixels`` and its floor
    set to ``min_pixels`` (None: the checkpoint's own; a budget above the checkpoint's does not
    raise it). Qwen-VL resizes every image to at most ``longest_edge`` pixels (and at least
    ``shortest_edge``), so this bounds the visual tokens of one image to about
    ``max_pixels / (patch_size * merge_size)**2``."""
    if max_pixels is None and min_pixels is None:
        return None
    own_low, own_high = _own_budget(processor)
    high = min(max_pixels, own_high) if max_pixels is not None else own_high
    low = min_pixels if min_pixels is not None else own_low
    return {"shortest_edge": min(low, high), "longest_edge": high}


def _own_budget(processor: Any) -> tuple[int, int]:
    """The checkpoint's (shortest_edge, longest_edge) pixel budget."""
    size = processor.image_processor.size
    low = getattr(size, "shortest_edge", None) or size.get("shortest_edge") or 0
    high = getattr(size, "longest_edge", None) or size.get("longest_edge")
    return int(low), int(high)


def pixels_per_visual_token(processor: Any) -> int:
    """Pixels one visual token covers: ``(patch_size * merge_size) ** 2`` (32x32 for Qwen3-VL)."""
    ip = processor.image_processor
    return int((ip.patch_size * getattr(ip, "merge_size", 1)) ** 2)


def max_visual_tokens(processor: Any, max_pixels: int | None) -> int:
    """The most visual tokens one image costs at budget ``max_pixels`` (None: the checkpoint's)."""
    high = _own_budget(processor)[1]
    if max_pixels is not None:
        high = min(high, max_pixels)
    return high // pixels_per_visual_token(processor)


def encode_batch(
    processor: Any,
    images: Sequence[Image | None],
    texts: Sequence[str],
    device: str,
    *,
    max_pixels: int | None = None,
    min_pixels: int | None = None,
) -> dict:
    """Tokenize templated texts with their images into one left-padded batch on ``device``.

    A row whose image is None is text only (its text holds no image placeholder). ``max_pixels`` /
    ``min_pixels`` set the image budget instead of the checkpoint's (see :func:`image_size`). An
    image the image processor cannot handle (e.g. an extreme aspect ratio) raises
    :class:`~shared.errors.InvalidInput` naming ``image_b64``.
    """
    size = image_size(processor, max_pixels, min_pixels)
    extra: dict[str, Any] = {"size": size} if size is not None else {}
    try:
        present = [im for im in images if im is not None]  # the processor takes them in text order
        batch = processor(
            text=list(texts), images=present or None, return_tensors="pt", padding=True, **extra
        )
    except (ValueError, TypeError) as exc:
        raise InvalidInput(f"image_b64: the model's image processor rejected the image: {exc}") from exc
    return {k: v.to(device) for k, v in batch.items()}


@dataclass(frozen=True)
class GenerationParams:
    """Decoding settings of one request; greedy unless a temperature above 0 is given."""

    max_new_tokens: int
    temperature: float | None = None
    top_p: float | None = None

    @property
    def greedy(self) -> bool:
        return not self.temperature


@dataclass(frozen=True)
class Generated:
    text: str
    tokens: int  # generated tokens, the end-of-sequence token included
    finish_reason: FinishReason = "stop"  # "length": the row's limit cut the answer
    prompt_tokens: int = 0  # the row's prompt as the model saw it, image tokens included
    image_tokens: int = 0  # visual tokens of the row's image


@dataclass(frozen=True)
class RowOptions:
    """What one row of a batch asks beyond the batch's decoding setting."""

    max_new_tokens: int
    stop: tuple[str, ...] = ()
    sink: TokenSink | None = None  # streams the row's text as it is generated
    cancelled: threading.Event | None = None  # set when nobody waits for the row any more


def context_length(model: Any) -> int | None:
    """The model's context window in tokens (``max_position_embeddings``), when it states one."""
    config = model.config
    text = getattr(config, "text_config", None) or config
    value = getattr(text, "max_position_embeddings", None)
    return int(value) if value else None


def generate(
    model: Any,
    processor: Any,
    images: Sequence[Image | None],
    texts: Sequence[str],
    params: GenerationParams,
    *,
    adapter_names: Sequence[str] | None = None,
    seed: int | None = None,
    rows: Sequence[RowOptions] | None = None,
    max_pixels: int | None = None,
    min_pixels: int | None = None,
) -> list[Generated]:
    """Generate for a batch of (image or None, templated text) rows; one decoding setting for the batch.

    ``adapter_names`` selects a PEFT adapter per row (mixed-adapter batch); rows with
    ``"__base__"`` use the base model. ``rows`` gives each row its own limit, stop strings, token
    sink and cancellation (:mod:`shared.decoding`); a row ends at its own limit, so under greedy
    decoding its output is the one it would get alone with its own limit. Every row's limit is also
    capped by the model's context (prompt + answer); a prompt that fills it is ``InvalidInput``.
    ``max_pixels`` / ``min_pixels``: the image budget (see :func:`image_size`).
    """
    import torch

    from shared.decoding import RowDecoder, RowTracker, tracker_criteria

    device = str(next(model.parameters()).device)
    batch = encode_batch(processor, images, texts, device, max_pixels=max_pixels, min_pixels=min_pixels)
    options = list(rows) if rows is not None else [RowOptions(params.max_new_tokens)] * len(texts)
    prompt_tokens = batch["attention_mask"].sum(dim=1).tolist()
    image_tokens = (batch["input_ids"] == processor.image_token_id).sum(dim=1).tolist()
    context = context_length(model)
    tokenizer = processor.tokenizer
    eos_ids = frozenset(_eos_ids(model, tokenizer))

    def decode(ids: list[int]) -> str:
        return str(tokenizer.decode(ids, skip_special_tokens=True))

    decoders = []
    for opt, used in zip(options, prompt_tokens, strict=True):
        limit = opt.max_new_tokens if context is None else min(opt.max_new_tokens, context - int(used))
        if limit < 1:
            raise InvalidInput(
                f"prompt: {used} tokens (image included) leave no room in the model's context of {context}"
            )
        decoders.append(RowDecoder(decode, eos_ids, limit, opt.stop, opt.sink, opt.cancelled))
    tracker = RowTracker(decoders, batch["input_ids"].shape[1])
    kwargs: dict[str, Any] = {"max_new_tokens": max(d.limit for d in decoders)}
    if params.greedy:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    else:
        kwargs.update(do_sample=True, temperature=params.temperature, top_p=params.top_p or 1.0, top_k=None)
        if seed is not None:
            torch.manual_seed(seed)
    if adapter_names is not None:
        kwargs["adapter_names"] = list(adapter_names)
    with torch.inference_mode():
        out = model.generate(
            **batch,
            **kwargs,
            stopping_criteria=[tracker_criteria(tracker)],
            pad_token_id=tokenizer.pad_token_id,
        )
    tracker.step(out)  # tokens of the last step, if generate ended before asking the criteria
    return [
        Generated(d.finish(), d.tokens, d.finish_reason, int(used), int(n_image))
        for d, used, n_image in zip(decoders, prompt_tokens, image_tokens, strict=True)
    ]


def _eos_ids(model: Any, tokenizer: Any) -> set[int]:
    eos = model.generation_config.eos_token_id
    ids = set(eos if isinstance(eos, list) else [eos]) if eos is not None else set()
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def next_token_logits(
    model: Any,
    processor: Any,
    images: Sequence[Image],
    texts: Sequence[str],
    *,
    adapter_names: Sequence[str] | None = None,
    max_pixels: int | None = None,
) -> torch.Tensor:
    """One forward pass: the logits of the first answer token for each row, float32 ``[batch, vocab]``.

    ``max_pixels``: the image budget of this forward (None: the checkpoint's)."""
    import torch

    device = str(next(model.parameters()).device)
    batch = encode_batch(processor, images, texts, device, max_pixels=max_pixels)
    kwargs: dict[str, Any] = {}
    if adapter_names is not None:
        kwargs["adapter_names"] = list(adapter_names)
    with torch.inference_mode():
        out = model(**batch, **kwargs, logits_to_keep=1)
    return out.logits[:, -1, :].float()


def label_token_ids(tokenizer: Any, labels: Sequence[str]) -> list[int]:
    """The single token id of each router label; a label that is not one token is a ``ValueError``
    (tools that score only single-token labels; the router scores any: :mod:`shared.scoring`)."""
    ids = []
    for label in labels:
        encoded = tokenizer.encode(label, add_special_tokens=False)
        if len(encoded) != 1:
            raise ValueError(f"router label {label!r} is {len(encoded)} tokens; labels must be single tokens")
        ids.append(encoded[0])
    return ids
