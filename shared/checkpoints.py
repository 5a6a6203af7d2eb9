"""Checkpoint folders: loading a Qwen3-VL model and its processor, dtypes, hashes of weights.

One code path serves a real ``Qwen/Qwen3-VL-8B-Instruct`` folder and the tiny demo checkpoints:
both are loaded with ``AutoModelForImageTextToText`` and, where torchvision is installed,
``AutoProcessor``. Without torchvision (the CPU wheels on our machines) transformers cannot build
Qwen3-VL's video processor (nor the ``Qwen2VLImageProcessorFast`` a real folder names), so we
assemble an image-only processor from the same folder's tokenizer, chat template and
``preprocessor_config.json`` (``Qwen2VLImageProcessorPil``, sizes from the file). The same fallback
is used, with a warning, when ``AutoProcessor`` fails for any other reason. Models are read from
folders only, never fetched from a hub.

torch and transformers are imported lazily so ``shared`` stays light for the HTTP layer.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

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
