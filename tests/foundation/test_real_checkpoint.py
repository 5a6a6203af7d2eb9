"""A checkpoint laid out like the real Qwen3-VL-8B-Instruct folder, through merge, workers and coordinator.

The fixture (``realformat.py``) has the hub repo's files and formats at tiny sizes: sharded bfloat16
weights with an index, ``rope_scaling`` configs, ``Qwen2VLImageProcessorFast`` and a video processor
config, the real special-token ids, the chat template where real repos keep it.
"""

from __future__ import annotations

import json
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from realformat import TEMPLATE_LAYOUTS, TOKEN_IDS, non_weight_files
from support import coordinator_process, free_port, wait_for, worker_process

from mole import synthetic
from mole.supervisor import ServiceProcess
from shared.checkpoints import METADATA_FILE, load_processor
from shared.images import encode_image_b64
from shared.modeling import encode_batch, render_prompt

REPO = Path(__file__).resolve().parents[2]
MAX_NEW_TOKENS = 12
WORKERS = ("merged-expert", "dynamic-0", "merged-plain")


def mole(*args: str, umask: int = 0o022) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mole.cli", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
        umask=umask,
    )


def _assert_world_readable(root: Path) -> None:
    wrong = {
        str(path.relative_to(root)): oct(stat.S_IMODE(path.stat().st_mode))
        for path in [root, *root.rglob("*")]
        if stat.S_IMODE(path.stat().st_mode) != (0o755 if path.is_dir() else 0o644)
    }
    assert not wrong, f"not world-readable (want 0644 files, 0755 folders): {wrong}"


# ---- the loader ---------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", [name for name in TEMPLATE_LAYOUTS if name != "base"])
def test_the_chat_template_is_read_from_wherever_the_checkpoint_keeps_it(
    realformat: Path, layout: str
) -> None:
    processor = load_processor(realformat / layout)
    text = render_prompt(processor, "Read this screen.")
    assert text == (
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Read this screen.<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert text == render_prompt(load_processor(realformat / "base"), "Read this screen.")
    image = synthetic.make_samples(1, seed=3)[0].image
    batch = encode_batch(processor, [image], [text], "cpu")
    ids = batch["input_ids"][0].tolist()
    image_tokens = int(batch["image_grid_thw"][0].prod()) // 4  # 2x2 spatial merge
    assert ids.count(TOKEN_IDS["<|image_pad|>"]) == image_tokens > 0
    assert ids.count(TOKEN_IDS["<|vision_start|>"]) == ids.count(TOKEN_IDS["<|vision_end|>"]) == 1
    assert processor.tokenizer.pad_token_id == TOKEN_IDS["<|endoftext|>"]


def test_without_torchvision_a_folder_lacking_the_video_config_still_loads(
    realformat: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """What ``mole merge`` used to publish: no video_preprocessor_config.json, so transformers infers a
    video processor from ``Qwen2VLImageProcessorFast`` and raises ValueError ("requires torchvision")."""
    from shared import checkpoints

    folder = tmp_path / "no-video-config"
    shutil.copytree(realformat / "base", folder)
    (folder / "video_preprocessor_config.json").unlink()
    assert render_prompt(load_processor(folder), "hi").endswith("<|im_start|>assistant\n")

    # Were torchvision importable but AutoProcessor still failed, the loader falls back and says why.
    monkeypatch.setattr(checkpoints, "torchvision_available", lambda: True)
    with caplog.at_level("WARNING", logger="shared.checkpoints"):
        processor = load_processor(folder)
    assert processor.image_processor.patch_size == 16
    assert any("AutoProcessor failed" in r.getMessage() for r in caplog.records)


# ---- merge and deploy ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def merged(realformat: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``mole merge`` of the random LoRA into the real-format base, under a umask that hides files.

    Written in float32 (the base is bfloat16) so the stack below compares merged and dynamic workers
    in float32 end to end; the bfloat16 merge is ``test_merge_realformat.py``'s."""
    out = tmp_path_factory.mktemp("realformat-merge") / "merged-expert"
    result = mole(
        "merge",
        "--base",
        str(realformat / "base"),
        "--adapter",
        str(realformat / "loras/expert/adapter"),
        "--out",
        str(out),
        "--dtype",
        "float32",
        umask=0o077,
    )
    assert result.returncode == 0, result.stderr
    return out


def test_merge_publishes_every_non_weight_file_of_the_base(realformat: Path, merged: Path) -> None:
    base = realformat / "base"
    assert {"video_preprocessor_config.json", "chat_template.json", "vocab.json", "merges.txt"} <= (
        non_weight_files(base)
    )
    missing = non_weight_files(base) - non_weight_files(merged)
    assert not missing, f"merged checkpoint lacks {sorted(missing)}"
    for name in non_weight_files(base) - {"config.json", "generation_config.json"}:
        assert (merged / name).read_bytes() == (base / name).read_bytes(), name
    # the weights are the streaming merge's: the base's shard names and index, not copies of its shards
    index = json.loads((merged / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in merged.glob("*.safetensors"))
    assert (
        shards
        == sorted(set(index["weight_map"].values()))
        == sorted(p.name for p in base.glob("*.safetensors"))
    )
    assert all((merged / s).read_bytes() != (base / s).read_bytes() for s in shards)  # float32, merged
    assert json.loads((merged / METADATA_FILE).read_text())["parity"]["passed"]


def test_merge_and_deploy_publish_world_readable_files(
    realformat: Path, merged: Path, tmp_path: Path
) -> None:
    _assert_world_readable(merged)

    adapter = shutil.copytree(realformat / "loras/expert/adapter", tmp_path / "private-adapter")
    for path in [adapter, *adapter.iterdir()]:  # owner-only, as safetensors writes weights
        path.chmod(0o700 if path.is_dir() else 0o600)

    vol = tmp_path / "vol"
    result = mole(
        "deploy-adapter", "--name", "expert", "--checkpoint", str(adapter), "--volume", str(vol), umask=0o077
    )
    assert result.returncode == 0, result.stderr
    _assert_world_readable(vol / "loras/expert")


# ---- real processes -----------------------------------------------------------------------------


@dataclass
class Stack:
    mapping: Path
    workers: dict[str, ServiceProcess]
    coordinator: ServiceProcess


def _write_mapping(realformat: Path, merged: Path, out: Path) -> Path:
    lora = str(realformat / "loras/expert/adapter")
    doc: dict[str, Any] = {
        "version": 1,
        "base_model": str(realformat / "base"),
        "coordinator": {"url": f"http://127.0.0.1:{free_port()}"},
        "router": {
            "adapter": str(realformat / "loras/router/adapter"),
            "labels": {"0": "expert", "1": "plain"},
        },
        "adapters": {
            "expert": {"label": "0", "lora": lora, "mode": "merged", "merged": str(merged)},
            # a standalone checkpoint whose chat template is only in chat_template.json
            "plain": {
                "label": "1",
                "lora": lora,
                "mode": "merged",
                "merged": str(realformat / "template-json"),
            },
        },
        "workers": [
            {"id": "merged-expert", "mode": "merged", "adapters": ["expert"]},
            {"id": "dynamic-0", "mode": "dynamic", "adapters": ["expert"]},
            {"id": "merged-plain", "mode": "merged", "adapters": ["plain"]},
        ],
        "routing": {"probe_interval_s": 0.3, "request_timeout_s": 60.0},
    }
    for worker in doc["workers"]:
        worker["url"] = f"http://127.0.0.1:{free_port()}"
    out.write_text(json.dumps(doc, indent=2))
    return out


@pytest.fixture(scope="module")
def stack(realformat: Path, merged: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("realformat-stack")
    mapping = _write_mapping(realformat, merged, root / "mapping.json")
    env = {"MOLE_DTYPE": "float32"}
    workers = {wid: worker_process(mapping, wid, root, env=env) for wid in WORKERS}
    coordinator = coordinator_process(mapping, root, env=env)
    try:
        for service in [*workers.values(), coordinator]:
            service.wait_ready(120)
        wait_for(
            lambda: all(
                w["state"] == "up" for w in httpx.get(f"{coordinator.url}/workers").json()["workers"]
            ),
            "every worker probed up",
        )
        yield Stack(mapping, workers, coordinator)
    finally:
        coordinator.stop()
        for service in workers.values():
            service.stop()


def _infer(url: str, sample: synthetic.Sample, adapter: str) -> dict[str, Any]:
    body = {
        "image_b64": encode_image_b64(sample.image),
        "prompt": sample.prompt,
        "adapter": adapter,
        "max_new_tokens": MAX_NEW_TOKENS,
    }
    resp = httpx.post(f"{url}/infer", json=body, timeout=60)
    assert resp.status_code == 200, resp.text
    return resp.json()


def test_merged_worker_on_the_real_layout_answers_as_the_dynamic_worker(stack: Stack) -> None:
    samples = synthetic.make_samples(3, seed=77)
    merged = [_infer(stack.workers["merged-expert"].url, s, "expert") for s in samples]
    dynamic = [_infer(stack.workers["dynamic-0"].url, s, "expert") for s in samples]
    assert [m["mode"] for m in merged] == ["merged"] * 3 and [d["mode"] for d in dynamic] == ["dynamic"] * 3
    assert all(m["output"] for m in merged)
    assert [m["output"] for m in merged] == [d["output"] for d in dynamic]  # fp32, greedy


def test_a_checkpoint_with_the_template_only_in_chat_template_json_serves(stack: Stack) -> None:
    info = httpx.get(f"{stack.workers['merged-plain'].url}/health/ready").json()
    assert info["status"] == "ready"
    answer = _infer(stack.workers["merged-plain"].url, synthetic.make_samples(1, seed=5)[0], "plain")
    assert answer["output"] and answer["worker_id"] == "merged-plain"


def test_coordinator_routes_explicit_and_router_requests_end_to_end(stack: Stack) -> None:
    sample = synthetic.make_samples(1, seed=77)[0]
    direct = _infer(stack.workers["merged-expert"].url, sample, "expert")["output"]
    body = {
        "image_b64": encode_image_b64(sample.image),
        "prompt": sample.prompt,
        "max_new_tokens": MAX_NEW_TOKENS,
    }
    with httpx.Client(base_url=stack.coordinator.url, timeout=60) as client:
        explicit = client.post("/classify", json={**body, "expert": "expert"}).json()
        dynamic = client.post("/classify", json={**body, "expert": "expert", "prefer_merged": False}).json()
        routed = client.post("/classify", json=body)
    assert explicit["routed_by"] == "explicit" and explicit["worker_id"] == "merged-expert"
    assert explicit["output"] == direct
    assert dynamic["worker_id"] == "dynamic-0" and dynamic["output"] == direct
    assert routed.status_code == 200, routed.text
    answer = routed.json()
    assert answer["routed_by"] == "router" and answer["adapter"] in ("expert", "plain")
    assert 0.0 < answer["confidence"] <= 1.0
