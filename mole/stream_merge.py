"""Streaming LoRA merge: a base checkpoint's safetensors + a PEFT LoRA → merged safetensors, one tensor
at a time.

A LoRA merge is ``W' = W + scale · B @ A`` for every Linear weight the adapter targets, with
``scale = lora_alpha / r`` (``lora_alpha / sqrt(r)`` under ``use_rslora``) and per-module ``r`` and
``lora_alpha`` from ``rank_pattern`` / ``alpha_pattern``, as PEFT computes it. Each base tensor is
read from its shard with plain file reads (no mmap, so no shard stays resident), a targeted weight
gets its delta added in float32 on ``device`` and is cast to the output dtype, and every tensor is
written straight into the output shard, whose header is known up front from the base's. The
output keeps the base's shard names, tensor names and index. Peak memory is the adapter plus the
working set of the largest tensor (:attr:`MergePlan.peak_bytes`), whatever the size of the model.

Only plain LoRA on Linear weights is merged here; any other adapter type or option is refused with
:class:`MergeRefused` naming the feature (see :data:`UNSUPPORTED_OPTIONS`).
"""

from __future__ import annotations

import json
import math
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from io import BufferedReader
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_PREFIX = "base_model.model."  # PEFT's prefix on saved adapter keys
LORA_SUFFIXES = (".lora_A.weight", ".lora_B.weight")
# adapter_config.json options the streaming merge does not implement: a truthy value is refused.
UNSUPPORTED_OPTIONS: dict[str, str] = {
    "use_dora": "DoRA (use_dora)",
    "modules_to_save": "modules_to_save (fully trained copies of whole modules)",
    "trainable_token_indices": "trainable token indices (trainable_token_indices)",
    "lora_bias": "LoRA bias terms (lora_bias)",
    "fan_in_fan_out": "fan_in_fan_out (Conv1D-style transposed weights)",
    "target_parameters": "LoRA on raw parameters (target_parameters)",
    "layer_replication": "layer_replication",
    "use_qalora": "QA-LoRA (use_qalora)",
    "use_bdlora": "block-diagonal LoRA (use_bdlora)",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
    "arrow_config": "Arrow routing (arrow_config)",
    "kasa_config": "KaSA (kasa_config)",
    "monteclora_config": "MonteCLoRA (monteclora_config)",
    "megatron_config": "Megatron parallel layers (megatron_config)",
}
# safetensors dtype names → torch dtype attribute names
ST_DTYPES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
}
FLOAT_NAMES = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16"}
ITEM_BYTES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
}


class MergeRefused(ValueError):
    """The adapter cannot be merged by the streaming merge (or its merge is not finite)."""


# ---- safetensors, read and written without mmap ----------------------------------------------
@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str  # safetensors name: "BF16", "F32", ...
    shape: tuple[int, ...]
    begin: int  # offsets into the data section
    end: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def read_header(path: Path) -> tuple[list[TensorInfo], dict[str, str], int]:
    """The tensors of a safetensors file in storage order, its ``__metadata__`` and where data starts."""
    with path.open("rb") as fh:
        (size,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(size))
    meta = header.pop("__metadata__", None) or {}
    infos = [
        TensorInfo(name, v["dtype"], tuple(v["shape"]), v["data_offsets"][0], v["data_offsets"][1])
        for name, v in header.items()
    ]
    return sorted(infos, key=lambda i: i.begin), meta, 8 + size


def _torch_dtype(st_dtype: str) -> torch.dtype:
    import torch

    if st_dtype not in ST_DTYPES:
        raise MergeRefused(f"tensors of dtype {st_dtype} are not supported by the streaming merge")
    return getattr(torch, ST_DTYPES[st_dtype])  # type: ignore[no-any-return]


def read_tensor(fh: BufferedReader, data_start: int, info: TensorInfo) -> torch.Tensor:
    import torch

    dtype = _torch_dtype(info.dtype)
    if info.end == info.begin:
        return torch.empty(info.shape, dtype=dtype)
    fh.seek(data_start + info.begin)
    buf = bytearray(info.end - info.begin)
    if fh.readinto(buf) != len(buf):
        raise MergeRefused(f"{info.name}: truncated safetensors file")
    return torch.frombuffer(buf, dtype=dtype).reshape(info.shape)


class ShardWriter:
    """Writes a safetensors file whose tensors (names, dtypes, shapes, order) are known up front,
    then takes their data one at a time, so no more than one tensor is ever held."""

    def __init__(self, path: Path, tensors: list[tuple[str, str, tuple[int, ...]]], meta: dict[str, str]):
        header: dict[str, Any] = {"__metadata__": meta} if meta else {}
        offset = 0
        self._order: list[tuple[str, int]] = []
        for name, dtype, shape in tensors:
            nbytes = math.prod(shape) * ITEM_BYTES[dtype]
            header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            self._order.append((name, nbytes))
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned, as safetensors writes it
        self.nbytes = offset
        self._fh = path.open("wb")
        self._fh.write(struct.pack("<Q", len(raw)) + raw)
        self._next = 0

    def write(self, name: str, data: bytes | bytearray | memoryview) -> None:
        expected, nbytes = self._order[self._next]
        if name != expected or len(data) != nbytes:
            raise AssertionError(
                f"shard writer: got {name} ({len(data)} B), expected {expected} ({nbytes} B)"
            )
        self._fh.write(data)
        self._next += 1

    def close(self) -> None:
        self._fh.close()
        if self._next != len(self._order):
            raise AssertionError(f"shard writer: {len(self._order) - self._next} tensors never written")


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    import torch

    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())  # type: ignore[arg-type]


# ---- the base checkpoint -----------------------------------------------------------------------
def weight_files(base: Path) -> list[str]:
    """The base's safetensors files, from ``model.safetensors.index.json`` or the single file."""
    index = base / "model.safetensors.index.json"
    if index.is_file():
        return sorted(set(json.loads(index.read_text())["weight_map"].values()))
    if (base / "model.safetensors").is_file():
        return ["model.safetensors"]
    raise MergeRefused(
        f"{base}: no model.safetensors(.index.json); the streaming merge reads safetensors only"
    )


def base_dtype(base: str | Path) -> str:
    """The dtype a checkpoint is stored in: ``config.json``'s ``dtype``/``torch_dtype`` (top level,
    then ``text_config``), else the most common floating dtype of its weights."""
    config = json.loads((Path(base) / "config.json").read_text())
    for section in (config, config.get("text_config") or {}):
        for key in ("dtype", "torch_dtype"):
            if section.get(key) in FLOAT_NAMES:
                return str(section[key])
    counts: dict[str, int] = {}
    for name in weight_files(Path(base)):
        for info in read_header(Path(base) / name)[0]:
            if info.dtype in ST_DTYPES and ST_DTYPES[info.dtype] in FLOAT_NAMES:
                counts[ST_DTYPES[info.dtype]] = counts.get(ST_DTYPES[info.dtype], 0) + info.numel
    if not counts:
        raise MergeRefused(f"{base}: cannot tell the checkpoint's dtype")
    return max(counts, key=lambda k: counts[k])


# ---- the adapter -------------------------------------------------------------------------------
def pattern_key(patterns: list[str], module: str) -> str | None:
    """The ``rank_pattern``/``alpha_pattern`` key matching ``module`` (PEFT's ``get_pattern_key``)."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return None


def lora_scale(config: dict[str, Any], module: str) -> tuple[int, float]:
    """``(r, scale)`` of ``module`` as PEFT sets them: patterns first, then ``r``/``lora_alpha``."""
    ranks, alphas = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    r_key, a_key = pattern_key(list(ranks), module), pattern_key(list(alphas), module)
    r = int(ranks[r_key] if r_key is not None else config["r"])
    alpha = float(alphas[a_key] if a_key is not None else config["lora_alpha"])
    return r, alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


def check_supported(config: dict[str, Any]) -> None:
    """Refuse (naming the feature) an adapter the streaming merge does not implement."""
    if config.get("peft_type", "LORA") != "LORA":
        raise MergeRefused(f"adapter type {config.get('peft_type')} is not supported (only LoRA)")
    used = [feature for key, feature in UNSUPPORTED_OPTIONS.items() if config.get(key)]
    if (config.get("bias") or "none") != "none":
        used.append(f"bias training (bias={config['bias']!r})")
    if used:
        raise MergeRefused("the streaming merge does not support " + ", ".join(used))


@dataclass
class LoraDelta:
    """One targeted weight: ``base_key`` gets ``scale · B @ A`` (A, B in float32)."""

    base_key: str
    a: torch.Tensor
    b: torch.Tensor
    scale: float


def load_lora(adapter: Path, device: str = "cpu") -> dict[str, LoraDelta]:
    """The adapter's deltas keyed by the base checkpoint key they modify (``<module>.weight``)."""
    import torch
    from safetensors.torch import load_file

    config = json.loads((adapter / "adapter_config.json").read_text())
    check_supported(config)
    path = adapter / ADAPTER_WEIGHTS
    if not path.is_file():
        raise MergeRefused(f"{adapter}: no {ADAPTER_WEIGHTS} (the streaming merge reads safetensors only)")
    tensors = load_file(str(path))
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        suffix = next((s for s in LORA_SUFFIXES if key.endswith(s)), None)
        if suffix is None:
            raise MergeRefused(f"adapter tensor {key} is not a LoRA A/B weight of a Linear layer")
        module = key.removesuffix(suffix).removeprefix(ADAPTER_PREFIX)
        pairs.setdefault(module, {})[suffix[6]] = value  # "A" or "B"
    deltas = {}
    for module, pair in pairs.items():
        if set(pair) != {"A", "B"}:
            raise MergeRefused(f"adapter module {module} lacks lora_{'B' if 'A' in pair else 'A'}")
        a, b = pair["A"], pair["B"]
        if a.dim() != 2 or b.dim() != 2:
            raise MergeRefused(f"{module}: LoRA on a non-Linear layer (A {tuple(a.shape)}) is not supported")
        r, scale = lora_scale(config, module)
        if a.shape[0] != r or b.shape[1] != r:
            raise MergeRefused(f"{module}: rank {a.shape[0]} in the weights, {r} in adapter_config.json")
        key = f"{module}.weight"
        deltas[key] = LoraDelta(key, a.to(device, torch.float32), b.to(device, torch.float32), scale)
    return deltas


# ---- plan and merge ----------------------------------------------------------------------------
@dataclass(frozen=True)
class MergePlan:
    """What a streaming merge will read and write, and the memory it needs."""

    base_dtype: str
    dtype: str  # written dtype of the floating tensors
    params: int
    targets: int  # base weights the adapter modifies
    adapter_bytes: int  # A and B in float32
    largest_tensor: str
    peak_bytes: int  # adapter + the working set of the largest tensor (see working_bytes)
    out_bytes: int  # total size of the merged weights


def _out_dtype(info: TensorInfo, dtype: str) -> str:
    floating = ST_DTYPES.get(info.dtype) in FLOAT_NAMES
    return FLOAT_NAMES[dtype] if floating else info.dtype


def working_bytes(info: TensorInfo, dtype: str, targeted: bool) -> int:
    """Bytes held while one tensor is merged: the bytes read, plus (targeted) its float32 copy to
    which B @ A is added in place, plus the bytes written when the dtype changes."""
    read = info.numel * ITEM_BYTES[info.dtype]
    out_dtype = _out_dtype(info, dtype)
    if targeted:
        return read + 4 * info.numel + info.numel * ITEM_BYTES[out_dtype]
    return read if out_dtype == info.dtype else read + info.numel * ITEM_BYTES[out_dtype]


def _all_tensors(base: Path) -> Iterator[tuple[str, TensorInfo]]:
    for name in weight_files(base):
        for info in read_header(base / name)[0]:
            yield name, info


def plan_merge(base: str | Path, adapter: str | Path, dtype: str) -> MergePlan:
    """Read the headers only (nothing is loaded) and check that every adapter module maps onto a
    base weight of the right shape."""
    from safetensors import safe_open

    base, adapter = Path(base), Path(adapter)
    check_supported(json.loads((adapter / "adapter_config.json").read_text()))
    with safe_open(str(adapter / ADAPTER_WEIGHTS), framework="pt") as fh:
        shapes = {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}
    targets = {
        k.removesuffix(".lora_A.weight").removeprefix(ADAPTER_PREFIX) + ".weight": shape
        for k, shape in shapes.items()
        if k.endswith(".lora_A.weight")
    }
    infos = [info for _, info in _all_tensors(base)]
    by_key = {info.name: info for info in infos}
    for key, a_shape in targets.items():
        if key not in by_key:
            raise MergeRefused(f"the adapter modifies {key}, which the base checkpoint does not hold")
        if len(by_key[key].shape) != 2 or by_key[key].shape[1] != a_shape[1]:
            raise MergeRefused(f"{key}: base shape {by_key[key].shape} does not fit LoRA A {a_shape}")
    work = {info.name: working_bytes(info, dtype, info.name in targets) for info in infos}
    largest = max(work, key=lambda k: work[k])
    adapter_bytes = 4 * sum(math.prod(s) for s in shapes.values())
    return MergePlan(
        base_dtype=base_dtype(base),
        dtype=dtype,
        params=sum(i.numel for i in infos),
        targets=len(targets),
        adapter_bytes=adapter_bytes,
        largest_tensor=largest,
        peak_bytes=adapter_bytes + work[largest],
        out_bytes=sum(i.numel * ITEM_BYTES[_out_dtype(i, dtype)] for i in infos),
    )


def stream_merge(
    base: str | Path, adapter: str | Path, out: str | Path, *, dtype: str, device: str = "cpu"
) -> list[str]:
    """Write the merged weights of ``adapter`` into ``base`` to the folder ``out`` (created): the
    base's shard files and index, floating tensors in ``dtype``. Returns the files written.

    Raises :class:`MergeRefused` for an unsupported adapter, a module the base does not hold, or a
    merged weight that is not finite (what PEFT's ``safe_merge`` checks)."""
    import torch

    base, adapter, out = Path(base), Path(adapter), Path(out)
    target_dtype = getattr(torch, dtype)
    deltas = load_lora(adapter, device)
    out.mkdir(parents=True, exist_ok=True)
    written, seen, sizes = [], set(), 0
    for name in weight_files(base):
        infos, meta, data_start = read_header(base / name)
        writer = ShardWriter(out / name, [(i.name, _out_dtype(i, dtype), i.shape) for i in infos], meta)
        with (base / name).open("rb") as fh:
            for info in infos:
                delta = deltas.get(info.name)
                if delta is None and _out_dtype(info, dtype) == info.dtype:  # bytes through
                    fh.seek(data_start + info.begin)
                    writer.write(info.name, fh.read(info.end - info.begin))
                    continue
                tensor = read_tensor(fh, data_start, info)
                if delta is not None:
                    merged = tensor.to(device, torch.float32)
                    merged.addmm_(delta.b, delta.a, alpha=delta.scale)  # W + scale · B @ A
                    if not torch.isfinite(merged).all():
                        raise MergeRefused(f"merged weight {info.name} is not finite (safe merge)")
                    tensor = merged.to(target_dtype)
                    seen.add(info.name)
                elif tensor.is_floating_point():
                    tensor = tensor.to(target_dtype)
                writer.write(info.name, tensor_bytes(tensor))
        writer.close()
        sizes += writer.nbytes
        written.append(name)
    missing = sorted(set(deltas) - seen)
    if missing:
        raise MergeRefused(f"the adapter modifies {missing[0]}, which the base checkpoint does not hold")
    index = base / "model.safetensors.index.json"
    if index.is_file():
        doc = json.loads(index.read_text())
        doc.setdefault("metadata", {})["total_size"] = sizes
        (out / index.name).write_text(json.dumps(doc, indent=2) + "\n")
        written.append(index.name)
    return written
