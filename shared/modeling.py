"""Qwen3-VL model and processor loading, prompt building, batched generation and label scoring.

One code path serves a real ``Qwen/Qwen3-VL-8B-Instruct`` folder and the tiny demo checkpoints:
both are loaded with ``AutoModelForImageTextToText`` and, where torchvision is installed,
``AutoProcessor``. Without torchvision (the CPU wheels on our machines) transformers cannot build
Qwen3-VL's video processor (nor the ``Qwen2VLImageProcessorFast`` a real folder names), so we
assemble an image-only processor from the same folder's tokenizer, chat template and
``preprocessor_config.json`` (``Qwen2VLImageProcessorPil``, sizes from the file). The same fallback
is used, with a warning, when ``AutoProcessor`` fails for any other reason.

torch and transformers are imported lazily so ``shared`` stays light for the HTTP layer.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shared.decoding import FinishReason, TokenSink
from shared.errors import InvalidInput

if TYPE_CHECKING:
    import torch
    from PIL.Image import Image

logger = logging.getLogger(__name__)

# The files that make up a checkpoint's processor (hashed into manifests).
PROCESSOR_FILES = (
    "preprocessor_config.json",
    "video_preprocessor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "chat_template.json",
)
# Written into a merged checkpoint by the merge pipeline (mole.merge); workers read its hash from it.
METADATA_FILE = "merge_metadata.json"


def _image_only_processor_class() -> type:
    from transformers import Qwen3VLProcessor
    from transformers.processing_utils import ProcessorMixin

    class ImageOnlyQwen3VLProcessor(Qwen3VLProcessor):
        """Qwen3-VL processor without the video half (which needs torchvision).

        Identical to ``Qwen3VLProcessor`` for image + text inputs: same placeholder expansion,
        same ``mm_token_type_ids``, same chat template.
        """

        def __init__(self, image_processor: Any = None, tokenizer: Any = None, chat_template: Any = None):
            self.image_token = getattr(tokenizer, "image_token", None) or "<|image_pad|>"
            self.video_token = getattr(tokenizer, "video_token", None) or "<|video_pad|>"
            self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
            self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)
            self.vision_start_token = getattr(tokenizer, "vision_start_token", None) or "<|vision_start|>"
            self.vision_end_token = getattr(tokenizer, "vision_end_token", None) or "<|vision_end|>"
            self.vision_start_token_id = tokenizer.convert_tokens_to_ids(self.vision_start_token)
            self.vision_end_token_id = tokenizer.convert_tokens_to_ids(self.vision_end_token)

    return ImageOnlyQwen3VLProcessor


_IMAGE_ONLY_CLS: type | None = None


def image_only_processor(image_processor: Any, tokenizer: Any, chat_template: str | None) -> Any:
    """Build the image-only Qwen3-VL processor (see module docstring)."""
    global _IMAGE_ONLY_CLS
    if _IMAGE_ONLY_CLS is None:
        _IMAGE_ONLY_CLS = _image_only_processor_class()
    return _IMAGE_ONLY_CLS(image_processor=image_processor, tokenizer=tokenizer, chat_template=chat_template)


def _checkpoint_dir(path: str | Path) -> Path:
    """``path`` as an existing folder; models are read from disk only, never fetched from a hub."""
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"checkpoint folder does not exist: {folder}")
    if not (folder / "config.json").is_file():  # e.g. a volume that is not mounted or still copying
        raise FileNotFoundError(f"no checkpoint in {folder}: config.json is missing")
    return folder


def _named_template(value: Any) -> str | None:
    """A chat template value as stored: a string, or named templates of which we take "default"."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        return _named_template(value.get("default"))
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        return _named_template(named.get("default"))
    return None


def read_chat_template(folder: Path, tokenizer: Any) -> str | None:
    """The chat template from wherever a checkpoint keeps it, first found wins:
    ``chat_template.jinja``, ``chat_template.json`` (``{"chat_template": ...}``), then the
    tokenizer's (``tokenizer_config.json``)."""
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    as_json = folder / "chat_template.json"
    if as_json.is_file():
        template = _named_template(json.loads(as_json.read_text(encoding="utf-8")).get("chat_template"))
        if template:
            return template
    return _named_template(getattr(tokenizer, "chat_template", None))


def torchvision_available() -> bool:
    """Whether torchvision can be imported (transformers needs it for Qwen3-VL's video processor)."""
    return importlib.util.find_spec("torchvision") is not None


def load_processor(path: str | Path) -> Any:
    """Load the processor of a Qwen3-VL checkpoint folder; tokenizer pads on the left for generation.

    Without torchvision, or when ``AutoProcessor`` fails, builds the image-only processor (see the
    module docstring). Raises ``ValueError`` when the folder yields no image processor or no chat
    template.
    """
    from transformers import AutoProcessor, AutoTokenizer
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    folder = _checkpoint_dir(path)
    processor: Any = None
    if not torchvision_available():
        logger.debug("%s: torchvision is not installed; building the image-only processor", folder)
    else:
        try:
            processor = AutoProcessor.from_pretrained(str(folder))
        except Exception as exc:  # whatever transformers raises, the image-only processor may still do
            logger.warning(
                "%s: AutoProcessor failed (%s: %s); building the image-only processor",
                folder,
                type(exc).__name__,
                exc,
            )
    if getattr(processor, "image_processor", None) is None:
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
        image_processor = Qwen2VLImageProcessorPil.from_pretrained(str(folder))
        processor = image_only_processor(image_processor, tokenizer, read_chat_template(folder, tokenizer))
    if getattr(processor, "image_processor", None) is None or not processor.chat_template:
        raise ValueError(f"{folder}: no Qwen3-VL image processor or chat template found")
    processor.tokenizer.padding_side = "left"
    return processor


def resolve_dtype(name: str) -> torch.dtype:
    import torch

    table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in table:
        raise ValueError(f"dtype must be one of {sorted(table)}, got {name!r}")
    return table[name]


PROGRESS_MIN_BYTES = 1 << 30  # checkpoints from this size show transformers' loading progress bar


def load_model(path: str | Path, *, device: str = "cpu", dtype: str = "float32") -> Any:
    """Load a Qwen3-VL checkpoint (standalone or merged) for inference, in eval mode.

    On an accelerator the weights go straight to ``device`` (``device_map``), tensor by tensor, so
    the host holds the checkpoint's mapped files rather than a second copy of the model. Logs
    ``loading X on DEVICE, DTYPE`` first (with the weights' size) and the memory in use when done;
    checkpoints of ``PROGRESS_MIN_BYTES`` or more show transformers' progress bar while they load.
    """
    import time

    from transformers import AutoModelForImageTextToText
    from transformers.utils import logging as hf_logging

    folder = _checkpoint_dir(path)
    weights = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    logger.info("loading %s on %s, %s (%.2f GB of weights)", folder, device, dtype, weights / 1e9)
    if weights >= PROGRESS_MIN_BYTES:
        hf_logging.enable_progress_bar()  # minutes for an 8B checkpoint: show that it moves
    else:
        hf_logging.disable_progress_bar()  # the bar of a tiny model would only flood the logs
    placement = {} if device == "cpu" else {"device_map": {"": device}}
    t0 = time.perf_counter()
    model = AutoModelForImageTextToText.from_pretrained(str(folder), dtype=resolve_dtype(dtype), **placement)
    model.eval()
    logger.info("loaded %s in %.1fs; %s", folder.name, time.perf_counter() - t0, memory_in_use(device))
    return model


def memory_in_use(device: str) -> str:
    """One line: the accelerator memory torch holds on ``device`` (when not cpu) and this process's
    peak resident memory."""
    import resource

    parts = []
    if device.startswith("cuda"):
        import torch

        allocated, reserved = torch.cuda.memory_allocated(device), torch.cuda.memory_reserved(device)
        parts.append(
            f"{device} memory allocated {allocated / 2**30:.2f} GiB, reserved {reserved / 2**30:.2f} GiB"
        )
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    parts.append(f"peak host RSS {peak_kib / 2**20:.2f} GiB")
    return ", ".join(parts)


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


def sha256_files(paths: Sequence[Path]) -> str:
    """Content hash over files (name and bytes), in the given order."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.name.encode())
        with path.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def sha256_dir(path: str | Path, patterns: Sequence[str] = ("*",)) -> str:
    """Content hash of a folder's files matching ``patterns`` (top level, sorted by name)."""
    root = Path(path)
    files = sorted({p for pat in patterns for p in root.glob(pat) if p.is_file()})
    return sha256_files(files)


def processor_hash(path: str | Path) -> str:
    """Content hash of a checkpoint's processor files (tokenizer, image processor, chat template)."""
    return sha256_dir(path, PROCESSOR_FILES)


def weights_hash(path: str | Path) -> str:
    """Content hash of a checkpoint's or adapter's weights and config."""
    return sha256_dir(path, ("*.safetensors", "*.bin", "config.json", "adapter_config.json"))
