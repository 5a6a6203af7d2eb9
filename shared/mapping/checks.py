"""The mapping's cross-entry rules, one function per rule.

Each rule takes a structurally valid :class:`MoleMapping` and yields one message per problem, naming
the entry (``adapters "login"``, ``workers[1] "dynamic-0"``, ``router.labels "3"``).
:func:`consistency_problems` runs every rule so one load reports every problem at once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from shared.mapping.schema import ADAPTER_NAME, ROUTER_MODEL_NAME, MoleMapping, WorkerSpec
from shared.schemas import ADAPTER_NAME_PATTERN

Rule = Callable[[MoleMapping], Iterator[str]]


def _bad_token(label: str) -> bool:
    return not label or any(ch.isspace() for ch in label)


def _worker_entry(i: int, w: WorkerSpec) -> str:
    return f'workers[{i}] "{w.id}"'


def _label_owners(m: MoleMapping) -> dict[str, str]:
    """Well-formed label -> the first adapter (in mapping order) that carries it."""
    owners: dict[str, str] = {}
    for name, spec in m.adapters.items():
        if spec.label is not None and not _bad_token(spec.label):
            owners.setdefault(spec.label, name)
    return owners


# --- adapters -------------------------------------------------------------------------------------


def adapter_names_are_safe(m: MoleMapping) -> Iterator[str]:
    for name in m.adapters:
        if not ADAPTER_NAME.match(name):
            yield f'adapters "{name}": adapter names must match {ADAPTER_NAME_PATTERN}'


def adapter_labels_are_tokens(m: MoleMapping) -> Iterator[str]:
    for name, spec in m.adapters.items():
        if spec.label is not None and _bad_token(spec.label):
            yield f'adapters "{name}": label "{spec.label}" must be a non-empty string without whitespace'


def adapter_labels_are_unique(m: MoleMapping) -> Iterator[str]:
    owners = _label_owners(m)
    for name, spec in m.adapters.items():
        if spec.label in owners and owners[spec.label] != name:
            yield f'adapters "{name}": label "{spec.label}" is already used by adapter "{owners[spec.label]}"'


def adapter_labels_are_routed(m: MoleMapping) -> Iterator[str]:
    for label, name in _label_owners(m).items():
        if m.router.labels.get(label) != name:
            yield f'adapters "{name}": label "{label}" does not map to "{name}" in router.labels'


def adapter_names_are_not_labels(m: MoleMapping) -> Iterator[str]:
    owners = _label_owners(m)
    for name in m.adapters:
        owner = owners.get(name)
        if owner is not None and owner != name:
            yield f'adapters "{name}": name equals the label of adapter "{owner}"'


def every_adapter_is_held(m: MoleMapping) -> Iterator[str]:
    for name, spec in m.adapters.items():
        if m.workers_for(name):
            continue
        if spec.label is not None:
            yield f'adapters "{name}": label "{spec.label}" has no worker holding adapter "{name}"'
        else:
            yield f'adapters "{name}": no worker holds adapter "{name}"'


# --- router ---------------------------------------------------------------------------------------


def router_labels_match_adapters(m: MoleMapping) -> Iterator[str]:
    for label, name in m.router.labels.items():
        entry = f'router.labels "{label}"'
        if _bad_token(label):
            yield f"{entry}: labels must be non-empty strings without whitespace"
        elif name not in m.adapters:
            yield f'{entry}: adapter "{name}" is not defined in "adapters"'
        elif (has := m.adapters[name].label) != label:
            yield (
                f'{entry}: adapter "{name}" has label "{has}" in "adapters"'
                if has is not None
                else f'{entry}: adapter "{name}" has no label in "adapters"'
            )


def router_thresholds_are_known_and_in_range(m: MoleMapping) -> Iterator[str]:
    for key, value in m.router.thresholds.items():
        entry = f'router.thresholds "{key}"'
        if key != "default" and key not in m.router.labels:
            yield f'{entry}: not "default" nor a label of router.labels'
        if not 0.0 <= value <= 1.0:
            yield f"{entry}: must be between 0 and 1, got {value}"


def router_fallback_is_defined(m: MoleMapping) -> Iterator[str]:
    fallback = m.router.fallback_adapter
    if fallback is not None and fallback not in m.adapters:
        yield f'router.fallback_adapter: adapter "{fallback}" is not defined'


# --- workers --------------------------------------------------------------------------------------


def _repeats(values: list[str]) -> Iterator[tuple[int, int]]:
    """``(index, index of the first use)`` for every value already used earlier in ``values``."""
    first: dict[str, int] = {}
    for i, value in enumerate(values):
        if value in first:
            yield i, first[value]
        first.setdefault(value, i)


def worker_ids_are_unique(m: MoleMapping) -> Iterator[str]:
    for i, j in _repeats([w.id for w in m.workers]):
        yield f"{_worker_entry(i, m.workers[i])}: id is already used by workers[{j}]"


def worker_urls_are_unique(m: MoleMapping) -> Iterator[str]:
    for i, j in _repeats([w.url for w in m.workers]):
        w = m.workers[i]
        yield f"{_worker_entry(i, w)}: url {w.url} is already used by workers[{j}]"


def worker_adapters_are_defined_once(m: MoleMapping) -> Iterator[str]:
    for i, w in enumerate(m.workers):
        for name in w.adapters:
            if name not in m.adapters:
                yield f'{_worker_entry(i, w)}: adapter "{name}" is not defined in "adapters"'
        twice = sorted({n for n in w.adapters if w.adapters.count(n) > 1})
        if twice:
            yield f"{_worker_entry(i, w)}: adapters listed twice: {', '.join(twice)}"


def worker_container_range(m: MoleMapping) -> Iterator[str]:
    for i, w in enumerate(m.workers):
        if w.min_containers > w.max_containers:
            yield f"{_worker_entry(i, w)}: min_containers {w.min_containers} > max_containers {w.max_containers}"


def merged_workers_hold_one_adapter_with_a_model(m: MoleMapping) -> Iterator[str]:
    for i, w in enumerate(m.workers):
        if w.mode != "merged":
            continue
        entry = _worker_entry(i, w)
        if len(w.adapters) != 1:
            yield f"{entry}: a merged worker holds exactly one adapter, got {len(w.adapters)} ({', '.join(w.adapters)})"
        elif w.model is None and w.adapters[0] in m.adapters and m.adapters[w.adapters[0]].merged is None:
            yield f'{entry}: no model: set "model" or adapters "{w.adapters[0]}".merged'
        if w.discover is not None:
            yield f"{entry}: discover is only for dynamic workers"


def dynamic_workers_hold_something(m: MoleMapping) -> Iterator[str]:
    for i, w in enumerate(m.workers):
        if w.mode == "dynamic" and not w.adapters and w.discover is None:
            yield f'{_worker_entry(i, w)}: a dynamic worker needs "adapters" or "discover"'


def served_base_name_is_free(m: MoleMapping) -> Iterator[str]:
    name = m.serve_base_as
    if name is None:
        return
    if not ADAPTER_NAME.match(name):
        yield f'serve_base_as "{name}": must match {ADAPTER_NAME_PATTERN}'
    elif name in m.adapters or name in m.router.labels:
        yield f'serve_base_as "{name}": already an adapter name or a router label'
    if not any(w.mode == "dynamic" for w in m.workers):
        yield f'serve_base_as "{name}": only dynamic workers serve the base model, and there is none'


def vllm_workers_load_at_start(m: MoleMapping) -> Iterator[str]:
    for i, w in enumerate(m.workers):
        for key in ("max_model_len", "gpu_memory_utilization"):
            if w.engine != "vllm" and getattr(w, key) is not None:
                yield f"{_worker_entry(i, w)}: {key} is a vLLM setting; this worker's engine is {w.engine}"
        if w.engine == "vllm" and w.discover is not None:
            yield f"{_worker_entry(i, w)}: discover is not supported on vLLM workers (they load their adapters at start)"


def router_served_by_a_dynamic_vllm_worker(m: MoleMapping) -> Iterator[str]:
    wid = m.router.served_by
    if wid is None:
        return
    worker = next((w for w in m.workers if w.id == wid), None)
    if worker is None:
        yield f'router.served_by "{wid}": no worker has that id'
    elif worker.engine != "vllm" or worker.mode != "dynamic":
        yield f'router.served_by "{wid}": must be a dynamic worker with "engine": "vllm" (it serves the router LoRA on the base model)'
    elif worker.model not in (None, m.base_model):
        yield f'router.served_by "{wid}": serves {worker.model}, not the base model the router LoRA was trained on'
    if ROUTER_MODEL_NAME in m.adapters:
        yield f'router.served_by: the router is served as "{ROUTER_MODEL_NAME}", which is an adapter\'s name here'
    if m.monolithic:
        yield "router.served_by: monolithic mode runs the router in the coordinator's process"


def monolithic_has_a_dynamic_worker(m: MoleMapping) -> Iterator[str]:
    first = next((w for w in m.workers if w.mode == "dynamic"), None)
    if m.monolithic and first is None:
        yield "monolithic: needs a dynamic worker to run in the coordinator's process"
    elif m.monolithic and first is not None and first.engine != "hf":
        yield f'monolithic: the first dynamic worker ("{first.id}") runs in the coordinator\'s process: its engine must be "hf"'


RULES: tuple[Rule, ...] = (
    adapter_names_are_safe,
    adapter_labels_are_tokens,
    adapter_labels_are_unique,
    adapter_labels_are_routed,
    adapter_names_are_not_labels,
    router_labels_match_adapters,
    router_thresholds_are_known_and_in_range,
    router_fallback_is_defined,
    worker_ids_are_unique,
    worker_urls_are_unique,
    worker_adapters_are_defined_once,
    worker_container_range,
    merged_workers_hold_one_adapter_with_a_model,
    dynamic_workers_hold_something,
    every_adapter_is_held,
    served_base_name_is_free,
    vllm_workers_load_at_start,
    router_served_by_a_dynamic_vllm_worker,
    monolithic_has_a_dynamic_worker,
)


def consistency_problems(m: MoleMapping) -> list[str]:
    """Every problem every rule finds, rule by rule, in mapping order within a rule."""
    return [problem for rule in RULES for problem in rule(m)]
