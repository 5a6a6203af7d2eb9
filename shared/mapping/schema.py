"""The mapping file's schema and the lookups on it: base model, router, adapters, workers, dispatch policy.

Each model here validates its own entry (types, ranges, URL shape, unknown keys). What ties entries
together (labels agree with the router, every adapter is held by a worker, relative paths resolved)
is done by :func:`shared.mapping.load.parse_mapping`, the only way a :class:`MoleMapping` should be
built.

Words: an *adapter* is a LoRA known by its name; a *label* is the router's output token for one
adapter. Keys renamed since the first files were written are still read, so old files stay valid:
the top-level ``routing`` is now ``dispatch``, an adapter's ``"mode": "merged"``/``"dynamic"`` is now
``"hot": true``/``false``. A file giving both the old and the new name is rejected.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator
from pydantic_core import PydanticCustomError

from shared.errors import AdapterNotFound, ConfigError
from shared.schemas import ADAPTER_NAME_PATTERN, Mode

# A worker's default image budget: 2048 visual tokens of Qwen3-VL (32x32 px each), so a 1080p
# screenshot (2.07 MP) passes untouched while one huge image cannot cost ~16k tokens (the checkpoint's
# own budget is 16.7 MP) and a static batch of eight stays a bounded prefill.
DEFAULT_WORKER_MAX_PIXELS = 2048 * 32 * 32
WORKER_ID_PATTERN = r"^[a-z0-9][a-z0-9-]{0,62}$"  # DNS-label-like: usable as a Modal app/compose name
Engine = Literal["hf", "vllm"]  # what runs a worker (see WorkerSpec.engine)
LOCAL_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})  # URLs `mole up` starts as child processes

ADAPTER_NAME = re.compile(ADAPTER_NAME_PATTERN)
_OLD_MODES = {"merged": True, "dynamic": False}  # an adapter's old "mode" value -> "hot"


# --- URLs -----------------------------------------------------------------------------------------


def _check_url(url: str) -> str:
    parts = urlsplit(url)
    try:
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        raise ValueError(f"invalid port in URL {url!r}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"must be an http(s) URL with a host, e.g. http://127.0.0.1:8101 (got {url!r})")
    return url.rstrip("/")


def url_host(url: str) -> str:
    """Host of ``url`` (IPv6 without brackets)."""
    return urlsplit(url).hostname or ""


def url_port(url: str) -> int:
    """Port of ``url``: explicit, else 443 for https and 80 for http."""
    parts = urlsplit(url)
    return parts.port or (443 if parts.scheme == "https" else 80)


def is_local_url(url: str) -> bool:
    """True when ``url``'s host is loopback (127.0.0.1, localhost, ::1)."""
    return url_host(url).lower() in LOCAL_HOSTS


# --- old key names --------------------------------------------------------------------------------


def _only_one_name(data: Any, old: str, new: str) -> None:
    """Reject an entry that gives a renamed key under both its old and its new name."""
    if isinstance(data, dict) and old in data and new in data:
        raise PydanticCustomError(
            "renamed_key",
            '"{old}" is the old name of "{new}"; give only "{new}"',
            {"old": old, "new": new},
        )


def current_keys(doc: dict[str, Any]) -> dict[str, Any]:
    """A copy of a raw mapping document with old key names replaced by today's (``routing`` ->
    ``dispatch``, an adapter's ``mode`` -> ``hot``), for tools that edit a file that may be old.
    Anything it cannot rename (both names given, an unknown old value) is left for validation."""
    doc = dict(doc)
    if "routing" in doc and "dispatch" not in doc:
        doc["dispatch"] = doc.pop("routing")
    if isinstance(doc.get("adapters"), dict):
        doc["adapters"] = {name: _hot_from_mode(spec) for name, spec in doc["adapters"].items()}
    return doc


def _old_mode(value: Any) -> bool | None:
    """``hot`` for an adapter's old ``mode`` value; None when it is not "merged" or "dynamic"."""
    return _OLD_MODES.get(value) if isinstance(value, str) else None


def _hot_from_mode(spec: Any) -> Any:
    if isinstance(spec, dict) and "hot" not in spec and (hot := _old_mode(spec.get("mode"))) is not None:
        spec = {k: v for k, v in spec.items() if k != "mode"}
        spec["hot"] = hot
    return spec


# --- models ---------------------------------------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _HasUrl(_Strict):
    """An entry reached at ``url`` (validated), with its host and port."""

    url: str

    @field_validator("url")
    @classmethod
    def _valid_url(cls, value: str) -> str:
        return _check_url(value)

    @property
    def host(self) -> str:
        """Host part of ``url``."""
        return url_host(self.url)

    @property
    def port(self) -> int:
        """Port part of ``url`` (scheme default when absent)."""
        return url_port(self.url)


class CoordinatorSpec(_HasUrl):
    """Where the coordinator listens (``mole up``) and where clients reach it."""

    url: str = "http://127.0.0.1:8000"  # http(s)://host:port


ROUTER_MODEL_NAME = "mole-router"  # the router LoRA's model name on the vLLM worker that serves it


class RouterSpec(_Strict):
    """The router LoRA and its labels; the labels' token sequences, scored in one batched pass, route a request."""

    adapter: str = Field(min_length=1)  # router LoRA folder
    prompt: str = Field(default="Which expert should handle this screen?", min_length=1)  # router question
    labels: dict[str, str] = Field(min_length=1)  # label (any number of tokens) -> adapter name
    thresholds: dict[str, float] = Field(default_factory=dict)  # "default" or a label -> min confidence
    fallback_adapter: str | None = None  # served when the top label is below threshold; None -> 422
    shadow: bool = False  # route and log, but serve the explicit/fallback choice
    # The router's image budget in pixels (None: the checkpoint's). Routing needs less detail than
    # answering: 262144 px is 256 visual tokens of Qwen3-VL (32x32 px each) against ~2000 for a
    # 1080p screenshot at the checkpoint's budget, and images below it are not touched.
    max_pixels: int | None = Field(default=262_144, ge=1024)
    # A dynamic vLLM worker that serves the router LoRA (as ROUTER_MODEL_NAME); the coordinator then
    # loads no model and asks it for the labels' log-probabilities. None: the coordinator runs it.
    served_by: str | None = None

    def ordered_labels(self) -> list[str]:
        """Labels in a stable order (numeric labels numerically, then the rest alphabetically)."""
        return sorted(self.labels, key=_label_key)

    def threshold(self, label: str) -> float:
        """Minimum confidence for ``label``: its own threshold, else "default", else 0."""
        return self.thresholds.get(label, self.thresholds.get("default", 0.0))


def _label_key(label: str) -> tuple[int, int, str]:
    return (0, int(label), "") if label.isdigit() else (1, 0, label)


class AdapterSpec(_Strict):
    """One LoRA adapter, known by its name in ``MoleMapping.adapters``.

    ``hot`` is descriptive: a hot adapter has a merged checkpoint (``merged``) that a merged worker
    serves. Dispatch never reads it; which workers serve an adapter, and how, is the workers' list.
    """

    label: str | None = None  # router label; None: reachable only by explicit name
    lora: str = Field(min_length=1)  # PEFT adapter folder
    hot: bool = False  # has a merged checkpoint served by a merged worker (old files: "mode": "merged")
    merged: str | None = None  # merged standalone checkpoint folder (for merged workers)
    system_prompt: str | None = None  # the system turn when the request brings none
    max_new_tokens: int | None = Field(default=None, ge=1)  # default answer length of this adapter
    max_new_tokens_cap: int | None = Field(
        default=None, ge=1
    )  # longest answer allowed (None: the worker's cap)
    description: str = ""  # free text for humans (check-config, the mapping file)

    @model_validator(mode="before")
    @classmethod
    def _old_mode_key(cls, data: Any) -> Any:
        """Files written before ``hot`` say ``"mode": "merged"`` (hot) or ``"mode": "dynamic"``."""
        if not isinstance(data, dict) or "mode" not in data:
            return data
        _only_one_name(data, "mode", "hot")
        if _old_mode(data["mode"]) is None:
            raise PydanticCustomError(
                "old_mode",
                '"mode" (the old name of "hot") must be "merged" or "dynamic", got {mode}',
                {"mode": repr(data["mode"])},
            )
        return _hot_from_mode(data)


class WorkerSpec(_HasUrl):
    """One worker replica. After :func:`~shared.mapping.load.parse_mapping` ``model`` is always set."""

    id: str = Field(pattern=WORKER_ID_PATTERN)  # unique worker id
    url: str  # where the coordinator reaches it
    mode: Mode  # "merged": one standalone checkpoint; "dynamic": base + many LoRAs
    engine: Engine = "hf"  # "hf": mole's worker (transformers + PEFT); "vllm": a vLLM OpenAI server
    max_model_len: int | None = Field(default=None, ge=64)  # vllm: context length (None: the model's)
    # vllm on a GPU: the share of its memory the server takes (None: vLLM's 0.9); set it below
    # 1 / (servers on that GPU) when several vLLM workers share one
    gpu_memory_utilization: float | None = Field(default=None, gt=0, le=1)
    adapters: list[str] = Field(default_factory=list)  # adapter names it holds
    model: str | None = None  # merged: checkpoint (default: adapter's merged); dynamic: None -> base_model
    discover: str | None = None  # dynamic only: folder whose <name>/adapter subfolders are loaded too
    gpu: str | None = None  # deployment hint (Modal GPU type), e.g. "H100"
    cpu: float | None = Field(default=None, gt=0)  # Modal: CPU cores reserved (None: modal_deploy's default)
    memory_mib: int | None = Field(
        default=None, ge=1024
    )  # Modal: memory reserved (None: modal_deploy's default)
    region: str | None = None  # Modal: region to pin the app to, e.g. "us-east" (None: anywhere)
    min_containers: int = Field(default=0, ge=0)  # Modal: warm containers kept
    max_containers: int = Field(default=1, ge=1)  # Modal: autoscaling ceiling
    scaledown_window_s: float = Field(default=300.0, ge=0)  # Modal: idle time before scale-down
    max_concurrency: int = Field(default=16, ge=1)  # concurrent requests one container accepts
    # Image budget of this worker's model in pixels: every image is resized to within it (None: the
    # checkpoint's own budget). Visual tokens per image <= max_pixels / (patch * merge)^2.
    max_pixels: int | None = Field(default=DEFAULT_WORKER_MAX_PIXELS, ge=1024)
    min_pixels: int | None = Field(default=None, ge=1)  # images below are upscaled (None: the checkpoint's)

    @model_validator(mode="after")
    def _pixel_budget(self) -> WorkerSpec:
        if self.min_pixels is not None and self.max_pixels is not None and self.min_pixels > self.max_pixels:
            raise ValueError(f"min_pixels ({self.min_pixels}) exceeds max_pixels ({self.max_pixels})")
        return self

    @property
    def capacity(self) -> int:
        """Requests the coordinator sends this worker at once: ``max_containers × max_concurrency``.

        An autoscaled endpoint (a Modal app) is one URL in front of up to ``max_containers``
        containers of ``max_concurrency`` each; sending it only one container's worth would never
        give its autoscaler a backlog to scale on. A worker that is one process (``mole up``,
        compose) keeps ``max_containers`` at 1, so its capacity is its ``max_concurrency``.
        """
        return self.max_containers * self.max_concurrency

    def is_local(self) -> bool:
        """True when the worker's URL is loopback, i.e. ``mole up`` starts it on this machine."""
        return is_local_url(self.url)


class DispatchPolicy(_Strict):
    """How the coordinator sends a routed request to a worker (the file's ``dispatch``, once ``routing``)."""

    prefer_merged: bool = True  # default of the request's prefer_merged
    fallback_to_dynamic: bool = True  # use a dynamic worker when no merged replica is ready
    connect_timeout_s: float = Field(default=2.0, gt=0)  # TCP connect to a worker
    request_timeout_s: float = Field(default=60.0, gt=0)  # one worker call
    retries: int = Field(default=1, ge=0)  # other replicas tried after a connect error/5xx
    retry_budget_ratio: float = Field(default=0.2, ge=0, le=1)  # retries allowed per request in the window
    retry_budget_floor: int = Field(default=10, ge=0)  # retries always allowed in the window, on top
    retry_budget_window_s: float = Field(default=10.0, gt=0)  # sliding window the budget counts over
    probe_interval_s: float = Field(default=2.0, gt=0)  # health probe period
    eject_after_failures: int = Field(default=5, ge=1)  # consecutive failures before ejecting a replica
    eject_base_s: float = Field(default=30.0, ge=0)  # ejection time × times ejected


class MoleMapping(_Strict):
    """The validated mapping. Build it with :func:`~shared.mapping.load.load_mapping` (or
    :func:`~shared.mapping.load.parse_mapping`), which also check the invariants below.

    Invariants after loading: every router label maps to a defined adapter carrying that label and
    vice versa; labels are unique strings without whitespace (any number of tokens); every adapter is held by at least one worker; every
    worker holds only defined adapters (exactly one when merged); worker ids and URLs are unique;
    every ``WorkerSpec.model`` is set; paths are absolute.
    """

    version: Literal[1] = 1  # format version (renamed keys are read as aliases, so still 1)
    base_model: str = Field(min_length=1)  # base Qwen3-VL folder (dynamic workers, router)
    coordinator: CoordinatorSpec = Field(default_factory=CoordinatorSpec)
    router: RouterSpec
    adapters: dict[str, AdapterSpec] = Field(min_length=1)  # adapter name -> spec
    workers: list[WorkerSpec] = Field(min_length=1)
    dispatch: DispatchPolicy = Field(
        default_factory=DispatchPolicy, validation_alias=AliasChoices("dispatch", "routing")
    )  # old files: "routing"
    monolithic: bool = False  # coordinator and one dynamic worker in one process
    serve_base_as: str | None = (
        None  # name under which dynamic workers serve the base model itself (no adapter)
    )

    _source: Path | None = PrivateAttr(default=None)

    @model_validator(mode="before")
    @classmethod
    def _old_dispatch_key(cls, data: Any) -> Any:
        _only_one_name(data, "routing", "dispatch")
        return data

    # --- lookups ----------------------------------------------------------------------------------

    @property
    def source_path(self) -> Path | None:
        """The file this mapping was loaded from, when loaded by :func:`load_mapping`."""
        return self._source

    def adapter_for(self, name_or_label: str | int) -> str:
        """Adapter name for a request's explicit ``expert``: an adapter name, or a label (str or int).

        Raises ``AdapterNotFound`` listing the known adapter names and labels.
        """
        if not isinstance(name_or_label, bool):
            key = str(name_or_label).strip()
            if key in self.adapters or (key and key == self.serve_base_as):
                return key
            if key in self.router.labels:
                return self.router.labels[key]
        names = sorted(self.adapters)
        labels = self.router.ordered_labels()
        raise AdapterNotFound(
            f'unknown expert "{name_or_label}"; known adapters: {", ".join(names)}; labels: {", ".join(labels)}',
            expert=str(name_or_label),
            adapters=names,
            labels=labels,
        )

    def workers_for(self, adapter: str) -> list[WorkerSpec]:
        """Workers whose ``adapters`` list holds ``adapter``, in mapping order (empty if none); the
        base model's name (``serve_base_as``) is held by every dynamic worker."""
        if adapter == self.serve_base_as:
            return [w for w in self.workers if w.mode == "dynamic"]
        return [w for w in self.workers if adapter in w.adapters]

    def worker(self, worker_id: str) -> WorkerSpec:
        """The worker with ``worker_id``; ``ConfigError`` listing the known ids otherwise."""
        for w in self.workers:
            if w.id == worker_id:
                return w
        known = ", ".join(w.id for w in self.workers)
        raise ConfigError(f'worker "{worker_id}" is not defined in the mapping; known workers: {known}')

    def model_path(self, worker_id: str) -> str:
        """The checkpoint folder a worker loads (merged checkpoint, or the base model)."""
        w = self.worker(worker_id)
        return w.model or self.base_model

    def adapters_on(self, worker_id: str, *, discover: bool = True) -> dict[str, str]:
        """Adapter name -> LoRA folder for everything a worker loads.

        With ``discover``, a dynamic worker's ``discover`` folder adds every ``<name>/adapter``
        subfolder not already in the mapping (the router's own adapter folder is skipped).
        """
        w = self.worker(worker_id)
        held = {name: self.adapters[name].lora for name in w.adapters}
        if discover and w.discover is not None:
            router_dir = os.path.normpath(self.router.adapter)
            for name, path in discover_adapters(w.discover).items():
                if name not in held and os.path.normpath(path) != router_dir:
                    held[name] = path
        return held

    def routing_table(self) -> list[tuple[str, str, list[str]]]:
        """``(label, adapter, worker ids)`` per router label in label order, then unlabeled adapters
        with label ``""``."""
        rows = [
            (label, self.router.labels[label], [w.id for w in self.workers_for(self.router.labels[label])])
            for label in self.router.ordered_labels()
        ]
        rows += [
            ("", name, [w.id for w in self.workers_for(name)])
            for name, spec in self.adapters.items()
            if spec.label is None
        ]
        return rows

    def format_routing_table(self) -> str:
        """Aligned plain-text routing table (label, adapter, hot, min confidence, workers with modes)."""
        modes = {w.id: w.mode for w in self.workers}
        rows = [("LABEL", "ADAPTER", "HOT", "MIN_CONF", "WORKERS")]
        for label, adapter, worker_ids in self.routing_table():
            rows.append(
                (
                    label or "-",
                    adapter,
                    "yes" if self.adapters[adapter].hot else "no",
                    f"{self.router.threshold(label):.2f}" if label else "-",
                    ", ".join(f"{wid} ({modes[wid]})" for wid in worker_ids),
                )
            )
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
        lines = [
            "  ".join([*(c.ljust(w) for c, w in zip(r[:-1], widths, strict=True)), r[-1]]).rstrip()
            for r in rows
        ]
        fallback = self.router.fallback_adapter
        lines.append(
            f"fallback adapter: {fallback}"
            if fallback
            else "fallback adapter: none (requests below threshold answer 422)"
        )
        if self.serve_base_as is not None:
            dynamic = ", ".join(w.id for w in self.workers_for(self.serve_base_as))
            lines.append(f"base model: served as {self.serve_base_as!r} by {dynamic} (by name only)")
        for w in self.workers:
            if w.discover is not None:
                lines.append(
                    f"discover: {w.id} serves every {w.discover}/<name>/adapter by name (expert, OpenAI "
                    "model) without a mapping edit; the router routes only to adapters with a router label"
                )
        return "\n".join(lines)


def discover_adapters(folder: str | Path) -> dict[str, str]:
    """``<folder>/<name>/adapter`` subfolders as name -> path, for names that are valid adapter
    names; a missing folder yields ``{}`` (volumes may be mounted later)."""
    root = Path(folder)
    if not root.is_dir():
        return {}
    return {
        child.name: str(child / "adapter")
        for child in sorted(root.iterdir())
        if ADAPTER_NAME.match(child.name) and (child / "adapter").is_dir()
    }
