"""Mapping loader/validator: env expansion, path resolution, every cross-entry error, old key names,
lookups."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from shared.errors import AdapterNotFound, ConfigError
from shared.mapping import (
    DispatchPolicy,
    MoleMapping,
    current_keys,
    discover_adapters,
    expand_env,
    is_local_url,
    load_mapping,
    parse_mapping,
)

REPO = Path(__file__).resolve().parents[2]
PRODUCTION_MAPPING = REPO / "config" / "expert_machine_mapping.json"


def base_doc() -> dict[str, Any]:
    """A small valid mapping with relative paths: two labelled adapters, one merged worker, one dynamic."""
    return {
        "version": 1,
        "base_model": "base",
        "coordinator": {"url": "http://127.0.0.1:8000"},
        "router": {
            "adapter": "router/adapter",
            "labels": {"0": "calendar", "1": "claim"},
            "thresholds": {"default": 0.0, "1": 0.6},
        },
        "adapters": {
            "calendar": {
                "label": "0",
                "lora": "loras/calendar/adapter",
                "hot": True,
                "merged": "merged/calendar",
            },
            "claim": {"label": "1", "lora": "loras/claim/adapter", "hot": False},
        },
        "workers": [
            {
                "id": "merged-calendar",
                "url": "http://127.0.0.1:8101",
                "mode": "merged",
                "adapters": ["calendar"],
            },
            {
                "id": "dynamic-0",
                "url": "http://127.0.0.1:8103",
                "mode": "dynamic",
                "adapters": ["calendar", "claim"],
            },
        ],
    }


def write(tmp_path: Path, doc: dict[str, Any] | str) -> Path:
    path = tmp_path / "mapping.json"
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc), encoding="utf-8")
    return path


def load_error(tmp_path: Path, doc: dict[str, Any] | str, **kwargs: Any) -> str:
    with pytest.raises(ConfigError) as info:
        load_mapping(write(tmp_path, doc), env={}, **kwargs)
    return info.value.message


# --- environment expansion ------------------------------------------------------------------------


def test_expand_env_set_unset_and_defaults() -> None:
    env = {"ROOT": "/data", "EMPTY": ""}
    assert expand_env("${ROOT}/m", env) == "/data/m"
    assert expand_env("${ROOT:-/x}/m", env) == "/data/m"
    assert expand_env("${MISSING:-/x}/m", env) == "/x/m"
    assert expand_env("${EMPTY:-/x}", env) == "/x"
    assert expand_env("${EMPTY}", env) == ""
    assert expand_env("a $b ${ROOT}", env) == "a $b /data"
    assert expand_env("http://${HOST:-h}:${PORT:-80}", env) == "http://h:80"


def test_expand_env_unset_without_default_names_variable_and_path() -> None:
    with pytest.raises(ConfigError) as info:
        expand_env("${NOPE}/x", {}, where="workers[0].url")
    assert "NOPE" in info.value.message
    assert "workers[0].url" in info.value.message


def test_unset_variable_in_document_names_json_path(tmp_path: Path) -> None:
    doc = base_doc()
    doc["workers"][1]["url"] = "${DYN_URL}"
    message = load_error(tmp_path, doc)
    assert "DYN_URL" in message and "workers[1].url" in message


def test_env_expansion_applies_to_document(tmp_path: Path) -> None:
    doc = base_doc()
    doc["base_model"] = "${ROOT:-/nowhere}/base"
    doc["workers"][1]["url"] = "${DYN_URL:-http://127.0.0.1:9999}"
    m = load_mapping(write(tmp_path, doc), env={"ROOT": "/data"})
    assert m.base_model == "/data/base"
    assert m.worker("dynamic-0").url == "http://127.0.0.1:9999"


# --- paths ----------------------------------------------------------------------------------------


def test_relative_paths_resolve_against_mapping_folder(tmp_path: Path) -> None:
    doc = base_doc()
    doc["adapters"]["claim"]["lora"] = "/abs/claim/adapter"
    m = load_mapping(write(tmp_path, doc), env={})
    assert m.base_model == str(tmp_path / "base")
    assert m.router.adapter == str(tmp_path / "router" / "adapter")
    assert m.adapters["calendar"].lora == str(tmp_path / "loras" / "calendar" / "adapter")
    assert m.adapters["calendar"].merged == str(tmp_path / "merged" / "calendar")
    assert m.adapters["claim"].lora == "/abs/claim/adapter"
    # merged worker model defaults to its adapter's merged checkpoint; dynamic to the base model
    assert m.worker("merged-calendar").model == str(tmp_path / "merged" / "calendar")
    assert m.worker("dynamic-0").model == str(tmp_path / "base")
    assert m.source_path == (tmp_path / "mapping.json").resolve()


def test_check_paths_reports_missing_folder(tmp_path: Path) -> None:
    for sub in ("base", "router/adapter", "loras/calendar/adapter", "merged/calendar"):
        (tmp_path / sub).mkdir(parents=True)
    message = load_error(tmp_path, base_doc(), check_paths=True)
    assert 'adapters "claim": lora path does not exist' in message
    assert str(tmp_path / "loras" / "claim" / "adapter") in message
    (tmp_path / "loras/claim/adapter").mkdir(parents=True)
    load_mapping(tmp_path / "mapping.json", env={}, check_paths=True)


def test_check_paths_off_by_default(tmp_path: Path) -> None:
    load_mapping(write(tmp_path, base_doc()), env={})


def test_discover_adds_adapters_but_not_router(tmp_path: Path) -> None:
    for name in ("router", "calendar", "extra"):
        (tmp_path / "loras" / name / "adapter").mkdir(parents=True)
    (tmp_path / "loras" / "no-adapter-folder").mkdir()
    doc = base_doc()
    doc["router"]["adapter"] = "loras/router/adapter"
    doc["workers"][1]["discover"] = "loras"
    m = load_mapping(write(tmp_path, doc), env={})
    assert set(discover_adapters(tmp_path / "loras")) == {"router", "calendar", "extra"}
    held = m.adapters_on("dynamic-0")
    assert set(held) == {"calendar", "claim", "extra"}
    assert held["calendar"] == m.adapters["calendar"].lora  # mapping wins over discovery
    assert set(m.adapters_on("dynamic-0", discover=False)) == {"calendar", "claim"}


# --- errors name the entry ------------------------------------------------------------------------


def test_invalid_json_reports_line_and_column(tmp_path: Path) -> None:
    message = load_error(tmp_path, '{\n  "version": 1,\n  "base_model": \n}')
    assert "invalid JSON" in message and "line 4" in message and "column" in message


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_mapping(tmp_path / "nope.json")


def test_worker_with_unknown_adapter(tmp_path: Path) -> None:
    doc = base_doc()
    doc["workers"][1]["adapters"].append("foo")
    message = load_error(tmp_path, doc)
    assert 'workers[1] "dynamic-0": adapter "foo" is not defined in "adapters"' in message


def test_duplicate_label(tmp_path: Path) -> None:
    doc = base_doc()
    doc["adapters"]["claim"]["label"] = "0"
    message = load_error(tmp_path, doc)
    assert 'adapters "claim": label "0" is already used by adapter "calendar"' in message


def test_label_with_no_worker(tmp_path: Path) -> None:
    doc = base_doc()
    doc["adapters"]["login"] = {"label": "2", "lora": "loras/login/adapter"}
    doc["router"]["labels"]["2"] = "login"
    message = load_error(tmp_path, doc)
    assert 'adapters "login": label "2" has no worker holding adapter "login"' in message


def test_merged_worker_with_two_adapters(tmp_path: Path) -> None:
    doc = base_doc()
    doc["workers"][0]["adapters"] = ["calendar", "claim"]
    message = load_error(tmp_path, doc)
    assert (
        'workers[0] "merged-calendar": a merged worker holds exactly one adapter, got 2 (calendar, claim)'
        in message
    )


def test_router_label_for_undefined_adapter(tmp_path: Path) -> None:
    doc = base_doc()
    doc["router"]["labels"]["3"] = "x"
    message = load_error(tmp_path, doc)
    assert 'router.labels "3": adapter "x" is not defined' in message


def test_adapter_label_missing_from_router(tmp_path: Path) -> None:
    doc = base_doc()
    del doc["router"]["labels"]["1"]
    message = load_error(tmp_path, doc)
    assert 'adapters "claim": label "1"' in message and "router.labels" in message


def test_router_label_disagrees_with_adapter_label(tmp_path: Path) -> None:
    doc = base_doc()
    doc["router"]["labels"] = {"0": "claim", "1": "calendar"}
    message = load_error(tmp_path, doc)
    assert 'router.labels "0": adapter "claim" has label "1"' in message


@pytest.mark.parametrize("label", ["", "a b", " 0"])
def test_label_must_be_single_token(tmp_path: Path, label: str) -> None:
    doc = base_doc()
    doc["adapters"]["calendar"]["label"] = label
    assert 'adapters "calendar": label' in load_error(tmp_path, doc)


def test_duplicate_worker_id_and_bad_id(tmp_path: Path) -> None:
    doc = base_doc()
    doc["workers"][1]["id"] = "merged-calendar"
    assert 'workers[1] "merged-calendar": id is already used by workers[0]' in load_error(tmp_path, doc)
    doc = base_doc()
    doc["workers"][1]["id"] = "Dynamic_0"
    message = load_error(tmp_path, doc)
    assert 'workers[1] "Dynamic_0".id' in message and "pattern" in message


def test_pydantic_errors_carry_json_path(tmp_path: Path) -> None:
    doc = base_doc()
    doc["adapters"]["claim"]["hot"] = "very"
    doc["dispatch"] = {"retries": -1}
    doc["workers"][0]["extra_field"] = 1
    message = load_error(tmp_path, doc)
    assert 'adapters "claim".hot' in message and "'very'" in message
    assert "dispatch.retries" in message
    assert 'workers[0] "merged-calendar".extra_field' in message


def test_bad_worker_url(tmp_path: Path) -> None:
    doc = base_doc()
    doc["workers"][0]["url"] = "worker:8101"
    assert 'workers[0] "merged-calendar".url' in load_error(tmp_path, doc)


def test_threshold_for_unknown_label_and_unknown_fallback(tmp_path: Path) -> None:
    doc = base_doc()
    doc["router"]["thresholds"]["9"] = 0.5
    doc["router"]["fallback_adapter"] = "nope"
    message = load_error(tmp_path, doc)
    assert 'router.thresholds "9"' in message
    assert 'router.fallback_adapter: adapter "nope"' in message


def test_all_problems_reported_together(tmp_path: Path) -> None:
    doc = base_doc()
    doc["workers"][1]["adapters"].append("foo")
    doc["workers"][0]["adapters"] = ["calendar", "claim"]
    with pytest.raises(ConfigError) as info:
        load_mapping(write(tmp_path, doc), env={})
    assert len(info.value.details["problems"]) == 2


def test_merged_worker_without_model(tmp_path: Path) -> None:
    doc = base_doc()
    del doc["adapters"]["calendar"]["merged"]
    assert 'workers[0] "merged-calendar": no model' in load_error(tmp_path, doc)
    doc["workers"][0]["model"] = "some/standalone"
    m = load_mapping(write(tmp_path, doc), env={})
    assert m.worker("merged-calendar").model == str(tmp_path / "some" / "standalone")


# --- old key names --------------------------------------------------------------------------------


def old_doc() -> dict[str, Any]:
    """:func:`base_doc` as files were written before the renames: ``routing`` and adapter ``mode``."""
    doc = base_doc()
    doc["adapters"]["calendar"]["mode"] = "merged"
    del doc["adapters"]["calendar"]["hot"]
    doc["adapters"]["claim"]["mode"] = "dynamic"
    del doc["adapters"]["claim"]["hot"]
    doc["routing"] = {"prefer_merged": False, "retries": 3, "probe_interval_s": 0.5}
    return doc


def new_doc() -> dict[str, Any]:
    doc = base_doc()
    doc["dispatch"] = {"prefer_merged": False, "retries": 3, "probe_interval_s": 0.5}
    return doc


def test_old_key_names_parse_to_the_same_mapping(tmp_path: Path) -> None:
    old = parse_mapping(old_doc(), base_dir=tmp_path, env={})
    new = parse_mapping(new_doc(), base_dir=tmp_path, env={})
    assert old.model_dump() == new.model_dump()
    assert old.dispatch.retries == 3 and old.dispatch.prefer_merged is False
    assert (old.adapters["calendar"].hot, old.adapters["claim"].hot) == (True, False)


def test_current_keys_renames_without_touching_the_input(tmp_path: Path) -> None:
    doc = old_doc()
    before = copy.deepcopy(doc)
    renamed = current_keys(doc)
    assert doc == before
    assert "routing" not in renamed and renamed["dispatch"] == doc["routing"]
    assert renamed["adapters"]["calendar"]["hot"] is True and "mode" not in renamed["adapters"]["calendar"]
    assert current_keys(new_doc()) == new_doc()
    new = parse_mapping(new_doc(), base_dir=tmp_path, env={})
    assert parse_mapping(renamed, base_dir=tmp_path, env={}) == new


def test_a_key_under_its_old_and_its_new_name_is_rejected(tmp_path: Path) -> None:
    both_sections = {**new_doc(), "routing": {"retries": 1}}
    assert '"routing" is the old name of "dispatch"; give only "dispatch"' in load_error(
        tmp_path, both_sections
    )
    both_keys = base_doc()
    both_keys["adapters"]["claim"]["mode"] = "dynamic"
    assert 'adapters "claim": "mode" is the old name of "hot"; give only "hot"' in load_error(
        tmp_path, both_keys
    )


def test_old_mode_value_must_be_merged_or_dynamic(tmp_path: Path) -> None:
    doc = old_doc()
    doc["adapters"]["claim"]["mode"] = "hot"
    message = load_error(tmp_path, doc)
    assert 'adapters "claim": "mode" (the old name of "hot") must be "merged" or "dynamic"' in message
    assert "got 'hot'" in message


def test_errors_in_an_old_section_name_it(tmp_path: Path) -> None:
    doc = old_doc()
    doc["routing"]["retries"] = -1
    assert "routing.retries" in load_error(tmp_path, doc)


def test_retry_budget_defaults() -> None:
    p = DispatchPolicy()
    assert (p.retry_budget_ratio, p.retry_budget_floor, p.retry_budget_window_s) == (0.2, 10, 10.0)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("retry_budget_ratio", -0.1),
        ("retry_budget_ratio", 1.5),
        ("retry_budget_floor", -1),
        ("retry_budget_floor", 2.5),
        ("retry_budget_window_s", 0),
        ("retry_budget_window_s", -1.0),
    ],
)
def test_retry_budget_ranges(tmp_path: Path, key: str, value: float) -> None:
    doc = new_doc()
    doc["dispatch"][key] = value
    assert f"dispatch.{key}" in load_error(tmp_path, doc)


def test_retry_budget_edges_are_valid(tmp_path: Path) -> None:
    doc = new_doc()
    doc["dispatch"].update(retry_budget_ratio=0.0, retry_budget_floor=0, retry_budget_window_s=0.5)
    m = parse_mapping(doc, base_dir=tmp_path, env={})
    assert (m.dispatch.retry_budget_ratio, m.dispatch.retry_budget_floor) == (0.0, 0)
    doc["dispatch"]["retry_budget_ratio"] = 1.0
    assert parse_mapping(doc, base_dir=tmp_path, env={}).dispatch.retry_budget_ratio == 1.0


# --- lookups --------------------------------------------------------------------------------------


@pytest.fixture
def mapping(tmp_path: Path) -> MoleMapping:
    return load_mapping(write(tmp_path, base_doc()), env={})


def test_adapter_for_name_label_and_int(mapping: MoleMapping) -> None:
    assert mapping.adapter_for("claim") == "claim"
    assert mapping.adapter_for("1") == "claim"
    assert mapping.adapter_for(0) == "calendar"


@pytest.mark.parametrize("name_or_label", ["nope", 7, True])
def test_adapter_for_unknown(mapping: MoleMapping, name_or_label: str | int) -> None:
    with pytest.raises(AdapterNotFound) as info:
        mapping.adapter_for(name_or_label)
    assert info.value.status == 404
    assert info.value.details["adapters"] == ["calendar", "claim"]
    assert info.value.details["labels"] == ["0", "1"]


def test_workers_and_routing_table(mapping: MoleMapping) -> None:
    assert [w.id for w in mapping.workers_for("calendar")] == ["merged-calendar", "dynamic-0"]
    assert [w.id for w in mapping.workers_for("claim")] == ["dynamic-0"]
    assert mapping.routing_table() == [
        ("0", "calendar", ["merged-calendar", "dynamic-0"]),
        ("1", "claim", ["dynamic-0"]),
    ]
    table = mapping.format_routing_table()
    lines = table.splitlines()
    assert lines[0].split() == ["LABEL", "ADAPTER", "HOT", "MIN_CONF", "WORKERS"]
    assert lines[1].split()[:3] == ["0", "calendar", "yes"] and lines[2].split()[:3] == ["1", "claim", "no"]
    assert lines[1].index("calendar") == lines[2].index("claim")  # aligned columns
    assert "0.60" in lines[2]
    assert mapping.router.threshold("1") == 0.6 and mapping.router.threshold("0") == 0.0
    with pytest.raises(ConfigError, match="known workers: merged-calendar, dynamic-0"):
        mapping.worker("nope")


def test_worker_url_parts(mapping: MoleMapping) -> None:
    w = mapping.worker("dynamic-0")
    assert (w.host, w.port, w.is_local()) == ("127.0.0.1", 8103, True)
    assert mapping.coordinator.port == 8000
    assert is_local_url("http://localhost:1") and is_local_url("http://[::1]:80")
    assert not is_local_url("http://worker-dynamic-0:8000")


def test_parse_mapping_does_not_mutate_input(tmp_path: Path) -> None:
    doc = base_doc()
    before = copy.deepcopy(doc)
    parse_mapping(doc, base_dir=tmp_path, env={})
    assert doc == before


# --- the committed production example -------------------------------------------------------------


def test_production_mapping_loads_with_defaults() -> None:
    m = load_mapping(PRODUCTION_MAPPING, env={})
    assert m.base_model == "/models/Qwen3-VL-8B-Instruct"
    assert m.router.adapter == "/vol/loras/router/adapter"
    assert [label for label, _, _ in m.routing_table()] == ["0", "1", "2", "3"]
    assert {a: s.hot for a, s in m.adapters.items()} == {
        "calendar": True,
        "claim": True,
        "login": False,
        "desktop": False,
    }
    assert m.dispatch == DispatchPolicy()  # the example spells out every default
    assert [w.id for w in m.workers] == ["merged-calendar", "merged-claim", "dynamic-0"]
    assert m.worker("merged-claim").url == "http://worker-merged-claim:8000"
    assert m.worker("dynamic-0").discover == "/vol/loras"
    assert m.worker("dynamic-0").model == "/models/Qwen3-VL-8B-Instruct"
    assert m.coordinator.url == "http://0.0.0.0:8000"


def test_production_mapping_env_overrides() -> None:
    env = {"MOLE_VOLUME": "/mnt/v", "MOLE_WORKER_DYNAMIC_0_URL": "http://10.0.0.5:9000"}
    m = load_mapping(PRODUCTION_MAPPING, env=env)
    assert m.adapters["login"].lora == "/mnt/v/loras/login/adapter"
    assert m.worker("dynamic-0").port == 9000


# --- engines --------------------------------------------------------------------------------------


def _folders(tmp_path: Path, ranks: dict[str, int], **extra: Any) -> None:
    """Every folder of base_doc, with an adapter_config.json of the given rank per adapter."""
    for folder in ("base", "router/adapter", "merged/calendar"):
        (tmp_path / folder).mkdir(parents=True, exist_ok=True)
    for name, rank in ranks.items():
        lora = tmp_path / "loras" / name / "adapter"
        lora.mkdir(parents=True, exist_ok=True)
        (lora / "adapter_config.json").write_text(json.dumps({"r": rank, **extra}))


def test_engine_defaults_to_hf_and_vllm_workers_are_sized_from_their_adapters(tmp_path: Path) -> None:
    from shared.mapping.engines import vllm_loras, vllm_rank

    doc = base_doc()
    doc["workers"][1]["engine"] = "vllm"
    _folders(tmp_path, {"calendar": 16, "claim": 12})
    mapping = load_mapping(write(tmp_path, doc), env={}, check_paths=True)
    assert mapping.workers[0].engine == "hf" and mapping.workers[1].engine == "vllm"
    loras = vllm_loras(mapping, mapping.workers[1])
    assert (loras.max_loras, loras.max_lora_rank) == (2, 16)  # rank 12 fits vLLM's 16
    assert set(loras.modules) == {"calendar", "claim"}
    assert [vllm_rank(r) for r in (1, 2, 9, 64, 300, 512, 513)] == [1, 8, 16, 64, 320, 512, None]


def test_vllm_workers_refuse_what_vllm_cannot_load(tmp_path: Path) -> None:
    doc = base_doc()
    doc["workers"][1]["engine"] = "vllm"
    _folders(tmp_path, {"calendar": 16, "claim": 1024})
    message = load_error(tmp_path, doc, check_paths=True)
    assert 'workers[1] "dynamic-0": adapter "claim" has rank 1024; vLLM serves ranks up to 512' in message
    _folders(tmp_path, {"calendar": 16, "claim": 8}, use_dora=True)
    assert "is a DoRA adapter, which vLLM does not load" in load_error(tmp_path, doc, check_paths=True)
    doc["workers"][1]["discover"] = "loras"
    assert "discover is not supported on vLLM workers" in load_error(tmp_path, doc)
    doc["workers"][1]["engine"] = "tgi"
    assert "engine" in load_error(tmp_path, doc)


def _safetensors_header(path: Path, names: list[str]) -> None:
    """A safetensors file holding ``names`` (one float each): what the engine rules read."""
    import struct

    header = {
        n: {"dtype": "F32", "shape": [1], "data_offsets": [4 * i, 4 * i + 4]} for i, n in enumerate(names)
    }
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * (4 * len(names)))


def test_vllm_refuses_a_vision_only_lora_and_warns_of_a_partly_visual_one(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    doc = base_doc()
    doc["workers"][1]["engine"] = "vllm"
    _folders(tmp_path, {"calendar": 16, "claim": 8})
    visual = "base_model.model.model.visual.blocks.0.attn.qkv.lora_A.weight"
    language = "base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.weight"
    _safetensors_header(tmp_path / "loras/claim/adapter/adapter_model.safetensors", [visual])
    message = load_error(tmp_path, doc, check_paths=True)
    assert 'adapter "claim" has LoRA weights on the vision tower (visual.*) only' in message
    _safetensors_header(tmp_path / "loras/claim/adapter/adapter_model.safetensors", [visual, language])
    with caplog.at_level("WARNING"):
        load_mapping(write(tmp_path, doc), env={}, check_paths=True)
    assert (
        'adapter "claim" has 1 LoRA tensors on the vision tower (visual.*), which vLLM ignores' in caplog.text
    )


def test_router_served_by_a_dynamic_vllm_worker_adds_the_router_lora(tmp_path: Path) -> None:
    from shared.mapping import ROUTER_MODEL_NAME
    from shared.mapping.engines import vllm_loras

    doc = base_doc()
    doc["router"]["served_by"] = "dynamic-0"
    assert 'router.served_by "dynamic-0": must be a dynamic worker with "engine": "vllm"' in load_error(
        tmp_path, doc
    )
    doc["router"]["served_by"] = "nobody"
    assert 'router.served_by "nobody": no worker has that id' in load_error(tmp_path, doc)
    doc["router"]["served_by"] = "dynamic-0"
    doc["workers"][1]["engine"] = "vllm"
    _folders(tmp_path, {"calendar": 16, "claim": 8})
    (tmp_path / "router/adapter/adapter_config.json").write_text(json.dumps({"r": 32}))
    mapping = load_mapping(write(tmp_path, doc), env={}, check_paths=True)
    loras = vllm_loras(mapping, mapping.workers[1])
    assert loras.modules[ROUTER_MODEL_NAME] == mapping.router.adapter
    assert (loras.max_loras, loras.max_lora_rank) == (3, 32)


def test_gpu_memory_utilization_reaches_a_gpu_vllm_server_and_is_refused_on_hf_workers(
    tmp_path: Path,
) -> None:
    from mole.vllm_worker import vllm_args

    doc = base_doc()
    doc["workers"][1].update(engine="vllm", gpu_memory_utilization=0.4)
    _folders(tmp_path, {"calendar": 16, "claim": 8})
    mapping = load_mapping(write(tmp_path, doc), env={}, check_paths=True)
    gpu = vllm_args(mapping, mapping.workers[1], cpu=False)
    assert gpu[gpu.index("--gpu-memory-utilization") + 1] == "0.4"
    assert "--gpu-memory-utilization" not in vllm_args(mapping, mapping.workers[1], cpu=True)
    doc["workers"][0]["gpu_memory_utilization"] = 0.4
    message = load_error(tmp_path, doc)
    assert 'workers[0] "merged-calendar": gpu_memory_utilization is a vLLM setting' in message
