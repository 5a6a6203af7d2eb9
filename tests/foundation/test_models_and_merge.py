"""The embedded model set and the merge pipeline, on the real tiny Qwen3-VL."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mole import synthetic
from mole.demo_assets import ROUTER_PROMPT, evaluate_expert, evaluate_router
from mole.merge import ParityError, merge_adapter, rollback
from shared.checkpoints import METADATA_FILE, load_model, load_processor
from shared.modeling import GenerationParams, generate, label_token_ids, render_prompt

REPO = Path(__file__).resolve().parents[2]


def mole(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mole.cli", *args], capture_output=True, text=True, cwd=REPO, timeout=300
    )


def test_loader_builds_a_real_qwen3_vl_processor_and_model(demo_assets: Path) -> None:
    from transformers import Qwen3VLForConditionalGeneration, Qwen3VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    processor = load_processor(demo_assets / "base")
    assert isinstance(processor, Qwen3VLProcessor)
    assert isinstance(processor.image_processor, Qwen2VLImageProcessorPil)
    assert processor.image_processor.patch_size == 16
    assert processor.tokenizer.padding_side == "left"
    model = load_model(demo_assets / "base")
    assert isinstance(model, Qwen3VLForConditionalGeneration)
    # the router's labels are single tokens, as the single-forward router requires
    assert len(set(label_token_ids(processor.tokenizer, ["0", "1", "2", "3"]))) == 4
    with pytest.raises(ValueError, match="single tokens"):
        label_token_ids(processor.tokenizer, ["calendar and claim"])
    text = render_prompt(processor, "Read this screen.", system_prompt="Be terse.")
    assert text.startswith("<|im_start|>system\nBe terse.<|im_end|>")
    assert text.endswith("<|im_start|>assistant\n") and "<|image_pad|>" in text


def test_loading_says_what_where_and_the_memory_used(
    demo_assets: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The CPU-testable half of GPU loading: the "loading X on DEVICE, DTYPE" line before and the
    memory line after (on cuda it also names the device memory; not run here, no GPU)."""
    with caplog.at_level("INFO", logger="shared.checkpoints"):
        model = load_model(demo_assets / "base", device="cpu", dtype="bfloat16")
    assert next(model.parameters()).dtype == torch.bfloat16
    lines = [r.getMessage() for r in caplog.records if r.name == "shared.checkpoints"]
    assert any(f"loading {demo_assets / 'base'} on cpu, bfloat16 (" in line for line in lines), lines
    assert any(line.startswith("loaded base in ") and "peak host RSS" in line for line in lines), lines


def test_missing_checkpoint_folder_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_processor(tmp_path / "nope")


def test_router_lora_routes_held_out_screens(demo_assets: Path) -> None:
    heldout = synthetic.make_samples(48, seed=4242)
    accuracy = evaluate_router(demo_assets / "base", demo_assets / "loras/router/adapter", heldout)
    assert accuracy >= 0.95
    report = json.loads((demo_assets / "assets.json").read_text())["report"]
    assert report["router_heldout_accuracy"] >= 0.95
    assert ROUTER_PROMPT  # the router question the mapping carries


@pytest.mark.parametrize("expert", synthetic.KINDS)
def test_each_expert_answers_in_its_own_format(demo_assets: Path, expert: str) -> None:
    samples = synthetic.make_samples(16, seed=31337)
    fmt, exact = evaluate_expert(
        demo_assets / "base", demo_assets / f"loras/{expert}/adapter", expert, samples
    )
    assert fmt == 1.0
    assert exact >= 0.8  # the answer depends on the picture, and the expert reads it


def test_merged_checkpoint_loads_without_peft_and_matches_the_adapter(demo_assets: Path) -> None:
    from peft import PeftModel

    merged_dir = demo_assets / "merged/calendar"
    meta = json.loads((merged_dir / METADATA_FILE).read_text())
    assert meta["parity"]["passed"] and meta["parity"]["greedy_exact_match"] == 1.0
    assert meta["parity"]["max_abs_logit_diff"] < 1e-3
    for key in ("base", "adapter", "merged"):
        assert len(meta[key]["sha256"]) == 64
    assert len(meta["processor_sha256"]) == 64

    merged = load_model(merged_dir)
    assert not any("lora" in name for name, _ in merged.named_parameters())
    processor = load_processor(merged_dir)
    unmerged = PeftModel.from_pretrained(
        load_model(demo_assets / "base"), str(demo_assets / "loras/calendar/adapter")
    )
    samples = synthetic.make_samples(8, seed=555)
    texts = [render_prompt(processor, s.prompt) for s in samples]
    images = [s.image for s in samples]
    params = GenerationParams(max_new_tokens=16)
    a = [g.text for g in generate(merged, processor, images, texts, params)]
    b = [g.text for g in generate(unmerged, processor, images, texts, params)]
    assert a == b


def _copy_adapter(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_parity_gate_refuses_a_corrupted_adapter(demo_assets: Path, tmp_path: Path) -> None:
    adapter = _copy_adapter(demo_assets / "loras/claim/adapter", tmp_path / "claim-corrupt")
    weights = load_file(str(adapter / "adapter_model.safetensors"))
    name = next(k for k in weights if "lora_B" in k)
    weights[name] = torch.full_like(weights[name], float("nan"))
    save_file(weights, str(adapter / "adapter_model.safetensors"))
    out = tmp_path / "merged-claim"
    with pytest.raises(ParityError, match=r"refus|non-finite|failed"):
        merge_adapter(demo_assets / "base", adapter, out)
    assert not out.exists(), "a failed merge must publish nothing"

    result = mole("merge", "--base", str(demo_assets / "base"), "--adapter", str(adapter), "--out", str(out))
    assert result.returncode == 1 and "claim-corrupt" in result.stderr
    assert not out.exists()


def test_parity_gate_catches_a_merge_that_drifts(demo_assets: Path, tmp_path: Path) -> None:
    """A limit tighter than float32 merge error shows the gate compares real logits."""
    from mole.merge import ParityLimits

    with pytest.raises(ParityError, match="max logit diff"):
        merge_adapter(
            demo_assets / "base",
            demo_assets / "loras/claim/adapter",
            tmp_path / "out",
            limits=ParityLimits(max_logit_diff=0.0),
        )


def test_merge_keeps_the_previous_version_for_rollback(demo_assets: Path, tmp_path: Path) -> None:
    out = tmp_path / "merged"
    first = merge_adapter(demo_assets / "base", demo_assets / "loras/login/adapter", out)
    second = merge_adapter(demo_assets / "base", demo_assets / "loras/desktop/adapter", out)
    assert first["merged"]["sha256"] != second["merged"]["sha256"]
    assert json.loads((out / METADATA_FILE).read_text())["adapter"]["path"].endswith("desktop/adapter")
    assert (tmp_path / "merged.prev").is_dir()

    result = mole("merge", "--out", str(out), "--rollback")
    assert result.returncode == 0, result.stderr
    assert json.loads((out / METADATA_FILE).read_text())["adapter"]["path"].endswith("login/adapter")
    rollback(out)  # and back again
    assert json.loads((out / METADATA_FILE).read_text())["adapter"]["path"].endswith("desktop/adapter")
    with pytest.raises(FileNotFoundError, match="no previous version"):
        rollback(tmp_path / "elsewhere")


def test_deploy_adapter_lays_out_the_volume_and_merges(demo_assets: Path, tmp_path: Path) -> None:
    vol = tmp_path / "vol"
    result = mole(
        "deploy-adapter",
        "--name",
        "login",
        "--checkpoint",
        str(demo_assets / "loras/login/adapter"),
        "--volume",
        str(vol),
        "--accuracy",
        "0.97",
        "--merge",
        "--base",
        str(demo_assets / "base"),
    )
    assert result.returncode == 0, result.stderr
    assert (vol / "loras/login/adapter/adapter_config.json").is_file()
    meta = json.loads((vol / "loras/login/deploy_metadata.json").read_text())
    assert meta["accuracy"] == 0.97 and len(meta["sha256"]) == 64
    assert json.loads((vol / "merged/login" / METADATA_FILE).read_text())["parity"]["passed"]

    bad = mole("deploy-adapter", "--name", "x", "--checkpoint", str(tmp_path), "--volume", str(vol))
    assert bad.returncode == 2 and "adapter_config.json" in bad.stderr


def test_check_config_prints_the_routing_table(demo_assets: Path, tmp_path: Path) -> None:
    result = mole("check-config", str(REPO / "config/expert_machine_mapping.json"))
    assert result.returncode == 0, result.stderr
    for name in ("calendar", "claim", "login", "desktop", "merged-calendar", "dynamic-0"):
        assert name in result.stdout
    result = mole("check-config", "--check-paths", str(demo_assets / "expert_machine_mapping.json"))
    assert result.returncode == 0, result.stderr

    doc = json.loads((demo_assets / "expert_machine_mapping.json").read_text())
    doc["workers"][0]["adapters"] = ["calendar", "claim"]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(doc))
    result = mole("check-config", str(bad))
    assert result.returncode == 1 and "merged-calendar" in result.stderr


def test_second_build_reuses_the_cache(demo_assets: Path) -> None:
    from mole.demo_assets import build_demo_assets

    before = (demo_assets / "base/model.safetensors").stat().st_mtime_ns
    messages: list[str] = []
    report = build_demo_assets(demo_assets, log=messages.append)
    assert messages == [f"demo assets up to date in {demo_assets.resolve()}"]
    assert (demo_assets / "base/model.safetensors").stat().st_mtime_ns == before
    assert report.router_heldout_accuracy >= 0.95


def test_merge_warns_loudly_about_vision_tower_weights(
    demo_assets: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=4, target_modules=r".*visual.*\.qkv|.*language_model.*\.q_proj", lora_dropout=0.0)
    model = get_peft_model(load_model(demo_assets / "base"), config)
    adapter = tmp_path / "vision-adapter"
    model.save_pretrained(str(adapter))
    with caplog.at_level("WARNING", logger="mole.merge"):
        manifest = merge_adapter(demo_assets / "base", adapter, tmp_path / "merged")
    assert manifest["vision_tower_tensors"] > 0
    assert any("VISION TOWER" in r.getMessage() for r in caplog.records)
