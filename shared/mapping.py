"""The expert-machine mapping: labels, adapters, modes and worker URLs, loaded and validated.

``load_mapping(path)`` reads the JSON document, expands ``${VAR}`` / ``${VAR:-default}`` in every
string, validates the structure, resolves relative paths against the mapping file's folder, checks
that labels, adapters and workers agree, and returns a :class:`MoleMapping`. Every failure is a
``ConfigError`` whose message names the offending entry, e.g.
``workers[1] "dynamic-0": adapter "foo" is not defined in "adapters"``.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from shared.errors import AdapterNotFound, ConfigError
from shared.schemas import ADAPTER_NAME_PATTERN, Mode

WORKER_ID_PATTERN = r"^[a-z0-9][a-z0-9-]{0,62}$"  # DNS-label-like: usable as a Modal app/compose name
LOCAL_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})  # URLs `mole up` starts as child processes

_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_ADAPTER_NAME = re.compile(ADAPTER_NAME_PATTERN)


# --- environment expansion ----------------------------------------------------------------------


def expand_env(s: str, env: Mapping[str, str], *, where: str = "") -> str:
    """Replace ``${VAR}`` and ``${VAR:-default}`` in ``s`` from ``env``.

    ``${VAR:-default}`` uses the default when VAR is unset or empty; ``${VAR}`` with VAR unset is a
    ``ConfigError`` naming the variable and ``where`` (the JSON path). A lone ``$`` is kept as is.
    """
    prefix = f"{where}: " if where else ""
    out: list[str] = []
    pos = 0
    while (start := s.find("${", pos)) != -1:
        match = _ENV_REF.match(s, start)
        if match is None:
            raise ConfigError(
                f"{prefix}invalid ${{...}} reference in {s!r}; use ${{VAR}} or ${{VAR:-default}}"
            )
        name, default = match.group(1), match.group(2)
        value = env.get(name)
        if default is not None:
            value = value or default
        elif value is None:
            raise ConfigError(
                f"{prefix}environment variable {name} is not set "
                f"(use ${{{name}:-default}} to give a default)",
                variable=name,
            )
        out.append(s[pos:start])
        out.append(value)
        pos = match.end()
    out.append(s[pos:])
    return "".join(out)


def _child(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


def _expand_tree(node: Any, env: Mapping[str, str], path: str) -> Any:
    if isinstance(node, str):
        return expand_env(node, env, where=path or "(document)")
    if isinstance(node, dict):
        return {k: _expand_tree(v, env, _child(path, k)) for k, v in node.items()}
    if isinstance(node, list):
        return [_expand_tree(v, env, _child(path, i)) for i, v in enumerate(node)]
    return node


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


# --- models ---------------------------------------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Served(_Strict):
    """A service reached at ``url`` (validated), with its host and port."""

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


class CoordinatorSpec(_Served):
    """Where the coordinator listens (``mole up``) and where clients reach it."""

    url: str = "http://127.0.0.1:8000"  # http(s)://host:port


class RouterSpec(_Strict):
    """The router LoRA and its label tokens; one forward + softmax over these labels routes a request."""

    adapter: str = Field(min_length=1)  # router LoRA folder
    prompt: str = Field(default="Which expert should handle this screen?", min_length=1)  # router question
    labels: dict[str, str] = Field(min_length=1)  # label token -> adapter name
    thresholds: dict[str, float] = Field(default_factory=dict)  # "default" or a label -> min confidence
    fallback_adapter: str | None = None  # served when the top label is below threshold; None -> 422
    shadow: bool = False  # route and log, but serve the explicit/fallback choice

    def ordered_labels(self) -> list[str]:
        """Labels in a stable order (numeric labels numerically, then the rest alphabetically)."""
        return sorted(self.labels, key=_label_key)

    def threshold(self, label: str) -> float:
        """Minimum confidence for ``label``: its own threshold, else "default", else 0."""
        return self.thresholds.get(label, self.thresholds.get("default", 0.0))


class AdapterSpec(_Strict):
    """One expert LoRA. ``mode`` says whether it is hot (served merged) or dynamic-only."""

    label: str | None = None  # router label token; None: reachable only by explicit name
    lora: str = Field(min_length=1)  # PEFT adapter folder
    mode: Mode = "dynamic"  # "merged": hot, prefer a merged worker; "dynamic": multi-LoRA worker only
    merged: str | None = None  # merged standalone checkpoint folder (for merged workers)
    system_prompt: str | None = None  # prepended as the system turn
    max_new_tokens: int | None = Field(default=None, ge=1)  # per-adapter generation default
    description: str = ""  # free text for humans and /v1/models


class WorkerSpec(_Served):
    """One worker replica. After :class:`MoleMapping` validation ``model`` is always set."""

    id: str = Field(pattern=WORKER_ID_PATTERN)  # unique worker id
    url: str  # where the coordinator reaches it
    mode: Mode  # "merged": one standalone checkpoint; "dynamic": base + many LoRAs
    adapters: list[str] = Field(default_factory=list)  # adapter names it holds
    model: str | None = None  # merged: checkpoint (default: adapter's merged); dynamic: None -> base_model
    discover: str | None = None  # dynamic only: folder whose <name>/adapter subfolders are loaded too
    gpu: str | None = None  # deployment hint (Modal GPU type), e.g. "H100"
    min_containers: int = Field(default=0, ge=0)  # Modal: warm containers kept
    max_containers: int = Field(default=1, ge=1)  # Modal: autoscaling ceiling
    scaledown_window_s: float = Field(default=300.0, ge=0)  # Modal: idle time before scale-down
    max_concurrency: int = Field(default=16, ge=1)  # concurrent requests one container accepts

    def is_local(self) -> bool:
        """True when the worker's URL is loopback, i.e. ``mole up`` starts it on this machine."""
        return is_local_url(self.url)


class RoutingSpec(_Strict):
    """Coordinator routing policy."""

    prefer_merged: bool = True  # default of the request's prefer_merged
    fallback_to_dynamic: bool = True  # use a dynamic worker when no merged replica is ready
    connect_timeout_s: float = Field(default=2.0, gt=0)  # TCP connect to a worker
    request_timeout_s: float = Field(default=60.0, gt=0)  # one worker call
    retries: int = Field(default=1, ge=0)  # other replicas tried after a connect error/5xx
    probe_interval_s: float = Field(default=2.0, gt=0)  # health probe period
    eject_after_failures: int = Field(default=5, ge=1)  # consecutive failures before ejecting a replica
    eject_base_s: float = Field(default=30.0, ge=0)  # first ejection time; doubles on repeat


def _label_key(label: str) -> tuple[int, int, str]:
    return (0, int(label), "") if label.isdigit() else (1, 0, label)


def _bad_token(label: str) -> bool:
    return not label or any(ch.isspace() for ch in label)


def _resolve(path: str, base_dir: Path) -> str:
    p = Path(path).expanduser()
    if p.is_absolute():
        return str(p)
    return os.path.normpath(base_dir / p)


class MoleMapping(_Strict):
    """The validated mapping. Construct through :func:`load_mapping` (or :func:`parse_mapping`).

    Invariants after validation: every router label maps to a defined adapter carrying that label and
    vice versa; labels are unique single tokens; every adapter is held by at least one worker; every
    worker holds only defined adapters (exactly one when merged); worker ids and URLs are unique;
    every ``WorkerSpec.model`` is set. Paths are absolute when validated with a ``base_dir`` context.
    """

    version: Literal[1] = 1  # format version
    base_model: str = Field(min_length=1)  # base Qwen3-VL folder (dynamic workers, router)
    coordinator: CoordinatorSpec = Field(default_factory=CoordinatorSpec)
    router: RouterSpec
    adapters: dict[str, AdapterSpec] = Field(min_length=1)  # adapter name -> spec
    workers: list[WorkerSpec] = Field(min_length=1)
    routing: RoutingSpec = Field(default_factory=RoutingSpec)
    monolithic: bool = False  # coordinator and one dynamic worker in one process

    _source: Path | None = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _finish(self, info: ValidationInfo) -> MoleMapping:
        base_dir = (info.context or {}).get("base_dir") if isinstance(info.context, dict) else None
        if base_dir is not None:
            self._resolve_paths(Path(base_dir))
        problems = _consistency_problems(self)
        if problems:
            raise ConfigError(_problems_message("invalid mapping", problems), problems=problems)
        for w in self.workers:
            if w.model is None:
                w.model = self.adapters[w.adapters[0]].merged if w.mode == "merged" else self.base_model
        return self

    def _resolve_paths(self, base_dir: Path) -> None:
        self.base_model = _resolve(self.base_model, base_dir)
        self.router.adapter = _resolve(self.router.adapter, base_dir)
        for spec in self.adapters.values():
            spec.lora = _resolve(spec.lora, base_dir)
            if spec.merged is not None:
                spec.merged = _resolve(spec.merged, base_dir)
        for w in self.workers:
            if w.model is not None:
                w.model = _resolve(w.model, base_dir)
            if w.discover is not None:
                w.discover = _resolve(w.discover, base_dir)

    # --- lookups ----------------------------------------------------------------------------------

    @property
    def source_path(self) -> Path | None:
        """The file this mapping was loaded from, when loaded by :func:`load_mapping`."""
        return self._source

    def adapter_for(self, expert: str | int) -> str:
        """Adapter name for an explicit ``expert``: an adapter name, or a label (str or int).

        Raises ``AdapterNotFound`` listing the known adapter names and labels.
        """
        if not isinstance(expert, bool):
            key = str(expert).strip()
            if key in self.adapters:
                return key
            if key in self.router.labels:
                return self.router.labels[key]
        names = sorted(self.adapters)
        labels = self.router.ordered_labels()
        raise AdapterNotFound(
            f'unknown expert "{expert}"; known adapters: {", ".join(names)}; labels: {", ".join(labels)}',
            expert=str(expert),
            adapters=names,
            labels=labels,
        )

    def workers_for(self, adapter: str) -> list[WorkerSpec]:
        """Workers whose ``adapters`` list holds ``adapter``, in mapping order (empty if none)."""
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
        """Aligned plain-text routing table (label, adapter, mode, min confidence, workers)."""
        modes = {w.id: w.mode for w in self.workers}
        rows = [("LABEL", "ADAPTER", "MODE", "MIN_CONF", "WORKERS")]
        for label, adapter, worker_ids in self.routing_table():
            rows.append(
                (
                    label or "-",
                    adapter,
                    self.adapters[adapter].mode,
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
        return "\n".join(lines)

    # --- filesystem -------------------------------------------------------------------------------

    def verify_paths(self) -> None:
        """``ConfigError`` listing every referenced folder that does not exist: base model, router
        adapter, adapter LoRAs, merged checkpoints of served merged-mode adapters, worker models,
        discover folders. Each folder is reported once, under the first entry naming it."""
        problems: list[str] = []
        seen: set[str] = set()

        def check(entry: str, what: str, path: str | None) -> None:
            if path is None or path in seen:
                return
            seen.add(path)
            p = Path(path)
            if not p.exists():
                problems.append(f"{entry}: {what} path does not exist: {path}")
            elif not p.is_dir():
                problems.append(f"{entry}: {what} path is not a directory: {path}")

        check("base_model", "base model", self.base_model)
        check("router.adapter", "router adapter", self.router.adapter)
        for name, spec in self.adapters.items():
            check(f'adapters "{name}"', "lora", spec.lora)
            if spec.mode == "merged" and self.workers_for(name):
                check(f'adapters "{name}"', "merged", spec.merged)
        for i, w in enumerate(self.workers):
            check(f'workers[{i}] "{w.id}"', "model", w.model)
            check(f'workers[{i}] "{w.id}"', "discover", w.discover)
        if problems:
            raise ConfigError(_problems_message("invalid mapping", problems), problems=problems)


def discover_adapters(folder: str | Path) -> dict[str, str]:
    """``<folder>/<name>/adapter`` subfolders as name -> path, for names that are valid adapter
    names; a missing folder yields ``{}`` (volumes may be mounted later)."""
    root = Path(folder)
    if not root.is_dir():
        return {}
    return {
        child.name: str(child / "adapter")
        for child in sorted(root.iterdir())
        if _ADAPTER_NAME.match(child.name) and (child / "adapter").is_dir()
    }


# --- cross-entry checks ---------------------------------------------------------------------------


def _consistency_problems(m: MoleMapping) -> list[str]:
    problems: list[str] = []
    label_owner: dict[str, str] = {}
    for name, spec in m.adapters.items():
        entry = f'adapters "{name}"'
        if not _ADAPTER_NAME.match(name):
            problems.append(f"{entry}: adapter names must match {ADAPTER_NAME_PATTERN}")
        if spec.label is None:
            continue
        if _bad_token(spec.label):
            problems.append(f'{entry}: label "{spec.label}" must be a single token without whitespace')
        elif spec.label in label_owner:
            first = label_owner[spec.label]
            problems.append(f'{entry}: label "{spec.label}" is already used by adapter "{first}"')
        else:
            label_owner[spec.label] = name
            if m.router.labels.get(spec.label) != name:
                problems.append(f'{entry}: label "{spec.label}" does not map to "{name}" in router.labels')
    for name in m.adapters:
        owner = label_owner.get(name)
        if owner is not None and owner != name:
            problems.append(f'adapters "{name}": name equals the label of adapter "{owner}"')

    for label, name in m.router.labels.items():
        entry = f'router.labels "{label}"'
        if _bad_token(label):
            problems.append(f"{entry}: labels must be single tokens without whitespace")
        elif name not in m.adapters:
            problems.append(f'{entry}: adapter "{name}" is not defined in "adapters"')
        elif m.adapters[name].label != label:
            has = m.adapters[name].label
            problems.append(
                f'{entry}: adapter "{name}" has label "{has}" in "adapters"'
                if has is not None
                else f'{entry}: adapter "{name}" has no label in "adapters"'
            )
    for key, value in m.router.thresholds.items():
        entry = f'router.thresholds "{key}"'
        if key != "default" and key not in m.router.labels:
            problems.append(f'{entry}: not "default" nor a label of router.labels')
        if not 0.0 <= value <= 1.0:
            problems.append(f"{entry}: must be between 0 and 1, got {value}")
    if m.router.fallback_adapter is not None and m.router.fallback_adapter not in m.adapters:
        problems.append(f'router.fallback_adapter: adapter "{m.router.fallback_adapter}" is not defined')

    ids: dict[str, int] = {}
    urls: dict[str, int] = {}
    for i, w in enumerate(m.workers):
        entry = f'workers[{i}] "{w.id}"'
        if w.id in ids:
            problems.append(f"{entry}: id is already used by workers[{ids[w.id]}]")
        ids.setdefault(w.id, i)
        if w.url in urls:
            problems.append(f"{entry}: url {w.url} is already used by workers[{urls[w.url]}]")
        urls.setdefault(w.url, i)
        for name in w.adapters:
            if name not in m.adapters:
                problems.append(f'{entry}: adapter "{name}" is not defined in "adapters"')
        dupes = sorted({n for n in w.adapters if w.adapters.count(n) > 1})
        if dupes:
            problems.append(f"{entry}: adapters listed twice: {', '.join(dupes)}")
        if w.min_containers > w.max_containers:
            problems.append(f"{entry}: min_containers {w.min_containers} > max_containers {w.max_containers}")
        if w.mode == "merged":
            if len(w.adapters) != 1:
                problems.append(
                    f"{entry}: a merged worker holds exactly one adapter, "
                    f"got {len(w.adapters)} ({', '.join(w.adapters)})"
                )
            elif w.model is None and w.adapters[0] in m.adapters and m.adapters[w.adapters[0]].merged is None:
                problems.append(f'{entry}: no model: set "model" or adapters "{w.adapters[0]}".merged')
            if w.discover is not None:
                problems.append(f"{entry}: discover is only for dynamic workers")
        elif not w.adapters and w.discover is None:
            problems.append(f'{entry}: a dynamic worker needs "adapters" or "discover"')

    for name, spec in m.adapters.items():
        if any(name in w.adapters for w in m.workers):
            continue
        if spec.label is not None:
            problems.append(f'adapters "{name}": label "{spec.label}" has no worker holding adapter "{name}"')
        else:
            problems.append(f'adapters "{name}": no worker holds adapter "{name}"')
    if m.monolithic and not any(w.mode == "dynamic" for w in m.workers):
        problems.append("monolithic: needs a dynamic worker to run in the coordinator's process")
    return problems


def _problems_message(prefix: str, problems: list[str]) -> str:
    if len(problems) == 1:
        return f"{prefix}: {problems[0]}"
    return f"{prefix} ({len(problems)} problems):\n  - " + "\n  - ".join(problems)


# --- pydantic errors as JSON paths ----------------------------------------------------------------

_DICT_FIELDS = {("adapters",), ("router", "labels"), ("router", "thresholds")}


def _loc_path(loc: tuple[int | str, ...], data: Any) -> str:
    """``('workers', 1, 'url')`` -> ``workers[1] "dynamic-0".url``; dict keys are quoted."""
    text = ""
    node: Any = data
    for i, part in enumerate(loc):
        if isinstance(part, int):
            text += f"[{part}]"
        elif tuple(str(p) for p in loc[:i]) in _DICT_FIELDS:
            text += f' "{part}"'
        else:
            text = f"{text}.{part}" if text else str(part)
        if isinstance(node, dict) and isinstance(part, str):
            node = node.get(part)
        elif isinstance(node, list) and isinstance(part, int) and part < len(node):
            node = node[part]
            if loc[:i] == ("workers",) and isinstance(node, dict) and isinstance(node.get("id"), str):
                text += f' "{node["id"]}"'
        else:
            node = None
    return text or "(document)"


def _validation_problems(exc: ValidationError, data: Any) -> list[str]:
    problems = []
    for err in exc.errors(include_url=False):
        msg = str(err["msg"])
        value = err.get("input")
        if err["type"] not in ("missing", "extra_forbidden") and isinstance(value, str | int | float | bool):
            msg += f" (got {value!r})"
        problems.append(f"{_loc_path(tuple(err['loc']), data)}: {msg}")
    return problems


# --- entry points ---------------------------------------------------------------------------------


def parse_mapping(
    data: Any,
    *,
    base_dir: str | Path,
    env: Mapping[str, str] | None = None,
    check_paths: bool = False,
    source: str = "mapping",
) -> MoleMapping:
    """Validate an already-parsed mapping document (see :func:`load_mapping`).

    ``env`` defaults to ``os.environ``; relative paths resolve against ``base_dir``; ``source`` names
    the document in error messages.
    """
    prefix = f"invalid mapping {source}"
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix}: the document must be a JSON object")
    try:
        expanded = _expand_tree(data, os.environ if env is None else env, "")
    except ConfigError as exc:
        raise ConfigError(f"{prefix}: {exc.message}", **exc.details) from None
    try:
        mapping = MoleMapping.model_validate(expanded, context={"base_dir": Path(base_dir)})
    except ValidationError as exc:
        problems = _validation_problems(exc, expanded)
        raise ConfigError(_problems_message(prefix, problems), problems=problems) from None
    except ConfigError as exc:
        problems = list(exc.details.get("problems", [exc.message]))
        raise ConfigError(_problems_message(prefix, problems), problems=problems) from None
    if check_paths:
        try:
            mapping.verify_paths()
        except ConfigError as exc:
            problems = list(exc.details.get("problems", [exc.message]))
            raise ConfigError(_problems_message(prefix, problems), problems=problems) from None
    return mapping


def load_mapping(
    path: str | Path, *, env: Mapping[str, str] | None = None, check_paths: bool = False
) -> MoleMapping:
    """Read, expand, validate and return the mapping at ``path``.

    ``env`` (default ``os.environ``) feeds ``${VAR}`` expansion; relative paths resolve against the
    file's folder; ``check_paths`` also requires every referenced folder to exist. Raises
    ``ConfigError`` naming the offending entry (and ``problems``: every problem found).
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"mapping file not found: {path}") from None
    except OSError as exc:
        raise ConfigError(f"cannot read mapping {path}: {exc.strerror or exc}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"invalid mapping {path}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}"
        ) from None
    mapping = parse_mapping(
        data, base_dir=path.resolve().parent, env=env, check_paths=check_paths, source=str(path)
    )
    mapping._source = path.resolve()
    return mapping
