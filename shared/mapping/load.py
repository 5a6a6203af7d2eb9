"""Reading a mapping file into a checked :class:`MoleMapping`.

``load_mapping(path)`` reads the JSON document, expands ``${VAR}`` / ``${VAR:-default}`` in every
string, validates each entry's shape (:mod:`shared.mapping.schema`), resolves relative paths against
the mapping file's folder, runs the cross-entry rules (:mod:`shared.mapping.checks`) and fills in
every worker's default model. Every failure is a ``ConfigError`` whose message names the offending
entry, e.g. ``workers[1] "dynamic-0": adapter "foo" is not defined in "adapters"``, and whose
``problems`` detail lists every problem found.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from shared.errors import ConfigError
from shared.mapping.checks import consistency_problems
from shared.mapping.engines import vllm_findings
from shared.mapping.schema import MoleMapping

logger = logging.getLogger(__name__)

_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


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


# --- paths ----------------------------------------------------------------------------------------


def _resolve(path: str, base_dir: Path) -> str:
    p = Path(path).expanduser()
    if p.is_absolute():
        return str(p)
    return os.path.normpath(base_dir / p)


def _resolve_paths(m: MoleMapping, base_dir: Path) -> None:
    m.base_model = _resolve(m.base_model, base_dir)
    m.router.adapter = _resolve(m.router.adapter, base_dir)
    for spec in m.adapters.values():
        spec.lora = _resolve(spec.lora, base_dir)
        if spec.merged is not None:
            spec.merged = _resolve(spec.merged, base_dir)
    for w in m.workers:
        if w.model is not None:
            w.model = _resolve(w.model, base_dir)
        if w.discover is not None:
            w.discover = _resolve(w.discover, base_dir)


def _fill_worker_models(m: MoleMapping) -> None:
    """A merged worker without ``model`` loads its adapter's merged checkpoint; a dynamic one the base."""
    for w in m.workers:
        if w.model is None:
            w.model = m.adapters[w.adapters[0]].merged if w.mode == "merged" else m.base_model


def _path_problems(m: MoleMapping) -> list[str]:
    """Every referenced folder that does not exist: base model, router adapter, adapter LoRAs, merged
    checkpoints of served hot adapters, worker models, discover folders. Each folder is reported
    once, under the first entry naming it."""
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

    check("base_model", "base model", m.base_model)
    check("router.adapter", "router adapter", m.router.adapter)
    for name, spec in m.adapters.items():
        check(f'adapters "{name}"', "lora", spec.lora)
        if spec.hot and m.workers_for(name):
            check(f'adapters "{name}"', "merged", spec.merged)
    for i, w in enumerate(m.workers):
        check(f'workers[{i}] "{w.id}"', "model", w.model)
        check(f'workers[{i}] "{w.id}"', "discover", w.discover)
    return problems


# --- error messages -------------------------------------------------------------------------------

_DICT_FIELDS = {("adapters",), ("router", "labels"), ("router", "thresholds")}


def _problems_message(prefix: str, problems: list[str]) -> str:
    if len(problems) == 1:
        return f"{prefix}: {problems[0]}"
    return f"{prefix} ({len(problems)} problems):\n  - " + "\n  - ".join(problems)


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
        mapping = MoleMapping.model_validate(expanded)
    except ValidationError as exc:
        problems = _validation_problems(exc, expanded)
        raise ConfigError(_problems_message(prefix, problems), problems=problems) from None
    _resolve_paths(mapping, Path(base_dir))
    problems = consistency_problems(mapping)
    warnings: list[str] = []
    if not problems:
        _fill_worker_models(mapping)
        if check_paths:
            problems = _path_problems(mapping)
        if check_paths and not problems:
            problems, warnings = vllm_findings(mapping)
    if problems:
        raise ConfigError(_problems_message(prefix, problems), problems=problems)
    for warning in warnings:
        logger.warning("%s", warning)
    return mapping


def load_mapping(
    path: str | Path, *, env: Mapping[str, str] | None = None, check_paths: bool = False
) -> MoleMapping:
    """Read, expand, validate and return the mapping at ``path``.

    ``env`` (default ``os.environ``) feeds ``${VAR}`` expansion; relative paths resolve against the
    file's folder; ``check_paths`` also requires every referenced folder to exist and vLLM workers'
    adapters to be ones vLLM loads (:mod:`shared.mapping.engines`). Raises
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
    mapping._source = path.resolve()  # the one place a mapping learns its file
    return mapping
