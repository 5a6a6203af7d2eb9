"""Model holders: what a worker keeps in memory, behind one small interface.

- :class:`MergedHolder`: a standalone Qwen3-VL checkpoint (a merged LoRA or any standalone
  expert) serving exactly one adapter name.
- :class:`DynamicHolder`: one base model with many PEFT adapters; a batch mixes adapters through
  PEFT's per-row ``adapter_names``, so no request waits for an adapter switch (``set_adapter`` is
  model-global state and is never used while serving).

``HOLDERS`` maps the mapping's ``mode`` to the class. Holders are thread-safe: ``generate`` and the
adapter load/unload calls serialise on one lock, so a hot load waits for the running batch and
never changes the model under it.
"""

from __future__ import annotations

import json
import logging
import threading
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from shared.checkpoints import METADATA_FILE, load_model, load_processor, sha256_dir, weights_hash
from shared.decoding import TokenSink
from shared.errors import AdapterNotFound, GenerationFailed, InvalidInput, MoleError, UnprocessableRequest
from shared.mapping import MoleMapping, WorkerSpec, discover_adapters
from shared.modeling import Generated, GenerationParams, RowOptions, generate

logger = logging.getLogger(__name__)


BASE_ADAPTER = "__base__"  # PEFT's per-row name for "no adapter" (never a valid adapter name)


@dataclass(frozen=True)
class Row:
    """One request as the compute thread sees it: decoded image (None: text only), templated text,
    decoding settings, stop strings, and for a streamed request its token sink and cancellation."""

    image: Any
    text: str
    adapter: str
    params: GenerationParams
    seed: int | None = None
    stop: tuple[str, ...] = ()
    sink: TokenSink | None = field(default=None, compare=False)  # streams the row's text
    cancelled: threading.Event = field(default_factory=threading.Event, compare=False)  # caller gone

    def options(self) -> RowOptions:
        return RowOptions(self.params.max_new_tokens, self.stop, self.sink, self.cancelled)

    @property
    def batch_key(self) -> tuple:
        """Rows with equal keys may share a generate call (greedy rows always can)."""
        if self.params.greedy:
            return ("greedy",)
        return ("sample", self.params.temperature, self.params.top_p, self.seed)


class ModelHolder(ABC):
    """A loaded model serving some adapters. ``load()`` once, then ``generate()`` from one thread."""

    mode: ClassVar[str]

    def __init__(self, spec: WorkerSpec, mapping: MoleMapping, *, device: str, dtype: str):
        self.spec = spec
        self.mapping = mapping
        self.device = device
        self.dtype = dtype
        self.model: Any = None
        self.processor: Any = None
        self._lock = threading.Lock()
        self._hashes: dict[str, str] = {}
        self.canary: Row | None = (
            None  # a known-good row (set after warm-up): tells bad requests from a broken model
        )

    @property
    def model_path(self) -> Path:
        """The checkpoint folder this holder loads (merged checkpoint, or the base model)."""
        return Path(self.mapping.model_path(self.spec.id))

    @abstractmethod
    def load(self) -> None:
        """Load weights and processor (slow; called once, off the event loop)."""

    @abstractmethod
    def _generate(self, rows: Sequence[Row]) -> list[Generated]: ...

    @property
    def lock(self) -> threading.Lock:
        """Held around every use of ``model``; whoever else runs the model must hold it too."""
        return self._lock

    def adapters(self) -> dict[str, str]:
        """Adapter name → sha256 of the weights actually loaded."""
        return dict(self._hashes)

    def generate(self, rows: Sequence[Row]) -> list[Generated]:
        """Run one batch (rows share a batch key). Raises ``AdapterNotFound`` for unknown adapters.

        A model failure on a single row is the request's fault when the canary row still generates
        (``UnprocessableRequest``, 422), the worker's when it does not (``GenerationFailed``, 500);
        a failed batch of several rows is ``GenerationFailed`` (the batcher retries each row alone).
        """
        for row in rows:
            if row.adapter not in self._hashes:
                raise AdapterNotFound(f"adapter {row.adapter!r} is not loaded", adapters=sorted(self._hashes))
        with self._lock:
            try:
                return self._generate(rows)
            except MoleError:
                raise
            except Exception as exc:  # a model failure: this batch's requests fail, the worker lives on
                if len(rows) == 1 and self._canary_generates():
                    raise UnprocessableRequest(
                        f"the model could not process this request ({exc.__class__.__name__}); "
                        "it serves other requests normally"
                    ) from exc
                raise GenerationFailed(f"generation failed: {exc.__class__.__name__}") from exc

    def _canary_generates(self) -> bool:
        """Whether the known-good row still generates (called with the lock held)."""
        if self.canary is None:
            return False
        try:
            self._generate([self.canary])
        except Exception:
            logger.exception("the canary row failed too: the model is broken")
            return False
        return True

    def undiscovered(self, *, settled: bool) -> dict[str, Path]:
        """Adapters on the volume not loaded yet (only dynamic workers discover any)."""
        return {}

    def add_adapter(self, name: str, path: Path) -> str:
        raise InvalidInput(f"a {self.mode} worker cannot load adapters; only dynamic workers can")

    def remove_adapter(self, name: str) -> None:
        raise InvalidInput(f"a {self.mode} worker cannot unload adapters; only dynamic workers can")

    def _run(self, rows: Sequence[Row], adapter_names: Sequence[str] | None) -> list[Generated]:
        first = rows[0]
        params = GenerationParams(
            max_new_tokens=max(r.params.max_new_tokens for r in rows),
            temperature=first.params.temperature,
            top_p=first.params.top_p,
        )
        return generate(
            self.model,
            self.processor,
            [r.image for r in rows],
            [r.text for r in rows],
            params,
            adapter_names=adapter_names,
            seed=first.seed,
            rows=[r.options() for r in rows],
            max_pixels=self.spec.max_pixels,
            min_pixels=self.spec.min_pixels,
        )


class MergedHolder(ModelHolder):
    """A standalone checkpoint serving exactly one adapter name."""

    mode = "merged"

    def load(self) -> None:
        path = self.model_path
        self.processor = load_processor(path)
        self.model = load_model(path, device=self.device, dtype=self.dtype)
        self._hashes = {self.spec.adapters[0]: _checkpoint_hash(path)}

    def _generate(self, rows: Sequence[Row]) -> list[Generated]:
        return self._run(rows, None)


class DynamicHolder(ModelHolder):
    """One base model with many PEFT adapters, mixed per row.

    Adapters are served under their names and held in PEFT under internal names
    (``_peft_names``): a hot load goes into the model under a fresh internal name and replaces the
    served one only once it loaded, so a failed load leaves the old adapter serving and no trace in
    the model.
    """

    mode = "dynamic"

    def __init__(self, spec: WorkerSpec, mapping: MoleMapping, *, device: str, dtype: str):
        super().__init__(spec, mapping, device=device, dtype=dtype)
        self._peft_names: dict[str, str] = {}  # served name -> adapter name inside the PEFT model
        self._loads = 0  # hot loads so far (internal names are unique)
        self._pending: dict[str, tuple] = {}  # discovered folder -> its files at the last look

    def adapter_paths(self) -> dict[str, Path]:
        """The adapters to load at start-up: the mapping's, then any discovered on the volume."""
        return {name: Path(p) for name, p in self.mapping.adapters_on(self.spec.id).items()}

    def load(self) -> None:
        from peft import PeftModel

        paths = self.adapter_paths()
        if not paths:
            raise ValueError(f"worker {self.spec.id!r}: a dynamic worker needs at least one adapter")
        self.processor = load_processor(self.model_path)
        base = load_model(self.model_path, device=self.device, dtype=self.dtype)
        items = list(paths.items())
        first_name, first_path = items[0]
        self.model = PeftModel.from_pretrained(base, str(first_path), adapter_name=first_name)
        self._hashes[first_name] = weights_hash(first_path)
        self._peft_names[first_name] = first_name
        for name, path in items[1:]:
            self.model.load_adapter(str(path), adapter_name=name)
            self._hashes[name] = weights_hash(path)
            self._peft_names[name] = name
        self.model.eval()
        if self.base_name is not None:  # the base model itself, served under a name of the mapping
            self._hashes[self.base_name] = sha256_dir(self.model_path, ("config.json",))
        logger.info("dynamic worker loaded %d adapters: %s", len(items), ", ".join(paths))

    @property
    def base_name(self) -> str | None:
        """The name the base model (no adapter) is served under, or None (mapping ``serve_base_as``)."""
        return self.mapping.serve_base_as

    def _generate(self, rows: Sequence[Row]) -> list[Generated]:
        names = [BASE_ADAPTER if r.adapter == self.base_name else self._peft_names[r.adapter] for r in rows]
        return self._run(rows, names)

    # ---- adapters dropped on the volume -----------------------------------------------------
    def undiscovered(self, *, settled: bool) -> dict[str, Path]:
        """Adapters in the ``discover`` folder that are not loaded yet (complete folders only).

        With ``settled``, only folders whose files did not change since the previous call (a copy
        in progress is not loaded half-written); without it, every complete folder.
        """
        if self.spec.discover is None:
            return {}
        router_dir = Path(self.mapping.router.adapter).resolve()
        found = {
            name: Path(path)
            for name, path in discover_adapters(self.spec.discover).items()
            if name not in self._hashes
            and name != self.base_name
            and Path(path).resolve() != router_dir
            and _complete_adapter(Path(path))
        }
        if not settled:
            return found
        signatures = {name: _signature(path) for name, path in found.items()}
        ready = {n: found[n] for n, sig in signatures.items() if self._pending.get(n) == sig}
        self._pending = {n: sig for n, sig in signatures.items() if n not in ready}
        return ready

    def add_adapter(self, name: str, path: Path) -> str:
        """Load (or replace) adapter ``name`` from ``path``; in-flight batches finish first.

        ``InvalidInput`` naming the problem when ``path`` is not a LoRA adapter this model can load;
        the adapter served under ``name`` before (if any) then keeps serving, unchanged.
        """
        check_adapter_folder(path)
        digest = weights_hash(path)
        with self._lock:
            self._loads += 1
            staging = f"mole_hot_{self._loads}"
            try:
                self.model.load_adapter(str(path), adapter_name=staging)
            except MemoryError:
                self._discard(staging)
                raise
            except Exception as exc:  # the files were read but do not fit this model
                self._discard(staging)
                detail = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
                raise InvalidInput(
                    f"path: {path} could not be loaded as a LoRA adapter of this model: "
                    f"{exc.__class__.__name__}: {detail}",
                    field="path",
                ) from None
            self.model.eval()
            replaced = self._peft_names.get(name)
            self._peft_names[name] = staging
            self._hashes[name] = digest
            if replaced is not None:
                self._discard(replaced)
        logger.info("loaded adapter %s (%s)", name, digest[:12])
        return digest

    def remove_adapter(self, name: str) -> None:
        if name == self.base_name:
            raise InvalidInput(f"{name!r} is the base model; it cannot be unloaded")
        with self._lock:
            if name not in self._hashes:
                raise AdapterNotFound(f"adapter {name!r} is not loaded", adapters=sorted(self._hashes))
            if len(self._hashes) == 1:
                raise InvalidInput(f"adapter {name!r} is the last one on this worker; load another first")
            del self._hashes[name]
            self._discard(self._peft_names.pop(name))
        logger.info("unloaded adapter %s", name)

    def add_hidden_adapter(self, name: str, path: Path) -> None:
        """Load adapter ``name`` into the model without serving it: ``adapters()`` does not list it,
        so no request can ask for it (the monolithic router LoRA). ``ValueError`` if ``name`` is
        already in the model."""
        with self._lock:
            if name in self.model.peft_config:
                raise ValueError(f"adapter {name!r} is already loaded")
            self.model.load_adapter(str(path), adapter_name=name)
            self.model.eval()
        logger.info("loaded hidden adapter %s", name)

    def remove_hidden_adapter(self, name: str) -> None:
        """Unload an adapter loaded by :meth:`add_hidden_adapter` (after the running batch)."""
        with self._lock:
            if name in self._peft_names.values() or name not in self.model.peft_config:
                raise ValueError(f"{name!r} is not a hidden adapter of this worker")
            self.model.delete_adapter(name)
        logger.info("unloaded hidden adapter %s", name)

    def _discard(self, peft_name: str) -> None:
        """Remove ``peft_name`` from the model, however far its load got (called with the lock held)."""
        if peft_name not in self.model.peft_config:
            return
        if self.model.active_adapter == peft_name:
            other = next((n for n in self._peft_names.values() if n != peft_name), None)
            if other is not None:
                self.model.set_adapter(other)
        self.model.delete_adapter(peft_name)


def check_adapter_folder(path: Path) -> dict[str, Any]:
    """The adapter config of a LoRA adapter folder; ``InvalidInput`` naming what is wrong otherwise
    (no folder or config, config not a JSON object, not a LoRA, no weights file)."""
    config_file = path / "adapter_config.json"
    if not config_file.is_file():
        raise InvalidInput(
            f"path: {path} is not a PEFT adapter folder (no adapter_config.json)", field="path"
        )
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise InvalidInput(f"path: {config_file} is not valid JSON: {exc}", field="path") from None
    if not isinstance(config, dict):
        raise InvalidInput(f"path: {config_file} is not a JSON object", field="path")
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        raise InvalidInput(
            f"path: {path} is a {peft_type or 'untyped'} adapter; dynamic workers load LoRA adapters only",
            field="path",
        )
    if not any((path / f).is_file() for f in ("adapter_model.safetensors", "adapter_model.bin")):
        raise InvalidInput(
            f"path: {path} has no adapter weights (adapter_model.safetensors or adapter_model.bin)",
            field="path",
        )
    return config


def _complete_adapter(path: Path) -> bool:
    """A PEFT adapter folder with its config and weights."""
    return (path / "adapter_config.json").is_file() and any(
        (path / f).is_file() for f in ("adapter_model.safetensors", "adapter_model.bin")
    )


def _signature(path: Path) -> tuple:
    """The folder's files with sizes and modification times (unchanged: the copy is finished)."""
    return tuple(
        sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in path.iterdir() if f.is_file())
    )


def _checkpoint_hash(path: Path) -> str:
    """The merged weights' hash from ``merge_metadata.json`` when present, else computed."""
    meta = path / METADATA_FILE
    if meta.is_file():
        try:
            return str(json.loads(meta.read_text())["merged"]["sha256"])
        except (KeyError, ValueError):
            pass
    return weights_hash(path)


HOLDERS: dict[str, type[ModelHolder]] = {"merged": MergedHolder, "dynamic": DynamicHolder}


def make_holder(spec: WorkerSpec, mapping: MoleMapping, *, device: str, dtype: str) -> ModelHolder:
    """The holder for ``spec.mode`` (registry lookup)."""
    return HOLDERS[spec.mode](spec, mapping, device=device, dtype=dtype)
