"""The adapter probe: one fixed question whose HF + PEFT answer is recorded next to an adapter, so
an engine that serves the adapter can be checked against it (a LoRA that vLLM loads but does not
apply answers as the base model).

``mole probe-adapters`` (and ``mole up`` before it starts vLLM workers) records, in the adapter's
folder as :data:`PROBE_FILE`: the rendered probe's token ids (image tokens expanded), the adapter's
greedy answer (its tokens, and the text of each of its starts), and each answer token's
log-probability under the adapter and under the base model, teacher-forced. The coordinator
(:mod:`coordinator.adapter_check`) asks the engine for the same tokens' log-probabilities, one
answer start at a time, and compares (:func:`verdict`). No torch here: the coordinator imports it.
"""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image, ImageDraw
from pydantic import BaseModel

PROBE_FILE = "mole_probe.json"
PROBE_PROMPT = "Read this screen and answer in a few words."
PROBE_TOKENS = 8  # answer tokens recorded (greedy)
PROBE_SIDE = 64  # the probe image is PROBE_SIDE x PROBE_SIDE pixels ...
PROBE_SIZE = {
    "shortest_edge": PROBE_SIDE * PROBE_SIDE,
    "longest_edge": PROBE_SIDE * PROBE_SIDE,
}  # ... kept so
# Mean absolute difference (nats per answer token) within which an engine's log-probabilities count
# as the reference's: float32 engines agree to ~1e-4; bfloat16 on a GPU drifts more (not measured here).
TOLERANCE = 0.15


def probe_image() -> Image.Image:
    """The probe's image: deterministic shapes and text on a gradient (no randomness, no files)."""
    img = Image.new("RGB", (PROBE_SIDE, PROBE_SIDE))
    img.putdata([(4 * x, 4 * y, 128) for y in range(PROBE_SIDE) for x in range(PROBE_SIDE)])
    draw = ImageDraw.Draw(img)
    draw.rectangle((8, 8, 40, 24), fill=(240, 240, 240), outline=(0, 0, 0))
    draw.text((10, 10), "OK", fill=(0, 0, 0))
    draw.ellipse((36, 36, 60, 60), fill=(200, 30, 30))
    return img


class ProbeRecord(BaseModel):
    """What ``mole_probe.json`` holds."""

    version: int = 1
    prompt: str
    answer: str  # the adapter's greedy answer (HF + PEFT)
    prompt_ids: list[int]  # the rendered probe up to the answer, image tokens expanded
    answer_ids: list[int]  # the answer's tokens
    starts: list[str]  # starts[k]: the text of answer_ids[:k] (each re-renders to exactly those ids)
    adapter_logprobs: list[float]  # each answer token's log-probability under the adapter
    base_logprobs: list[float]  # ... and under the base model alone
    dtype: str
    device: str
    engine: str = "hf"


def read_record(folder: str | Path) -> ProbeRecord | None:
    """The adapter folder's record; None when it has none (``ValueError`` when it is unreadable)."""
    path = Path(folder) / PROBE_FILE
    if not path.is_file():
        return None
    try:
        return ProbeRecord.model_validate_json(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: {exc}") from None


def write_record(folder: str | Path, record: ProbeRecord) -> Path:
    """Write the record atomically (a reader never sees half a file)."""
    path = Path(folder) / PROBE_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record.model_dump(), indent=1), encoding="utf-8")
    tmp.replace(path)
    return path


def _mean_abs(a: list[float], b: list[float]) -> float:
    return sum(abs(x - y) for x, y in zip(a, b, strict=True)) / max(1, len(a))


def is_informative(record: ProbeRecord, *, tolerance: float = TOLERANCE) -> bool:
    """Whether the probe tells the adapter from the base model (their log-probabilities differ by
    more than ``tolerance``); a check against an uninformative record proves nothing."""
    return _mean_abs(record.adapter_logprobs, record.base_logprobs) > tolerance


def verdict(record: ProbeRecord, logprobs: list[float], *, tolerance: float = TOLERANCE) -> str | None:
    """None when ``logprobs`` (the engine's, for the record's answer tokens) match the adapter's;
    else why not, saying whether they match the base model's instead (the adapter not applied)."""
    to_adapter = _mean_abs(logprobs, record.adapter_logprobs)
    to_base = _mean_abs(logprobs, record.base_logprobs)
    if to_adapter <= tolerance:
        return None
    if to_base < to_adapter:
        return (
            f"answers as the base model, not as the adapter (log-probabilities {to_base:.4f} from the "
            f"base model's, {to_adapter:.4f} from the adapter's HF reference): the engine did not apply it"
        )
    return (
        f"differs from the adapter's HF reference by {to_adapter:.4f} nats per token (tolerance {tolerance})"
    )
