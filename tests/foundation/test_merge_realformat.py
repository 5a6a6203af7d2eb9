"""The streaming merge and its parity gate on the real-format checkpoint (bfloat16, sharded, indexed).

The streaming merge's arithmetic is checked against PEFT's own ``merge_and_unload`` for the scaling
options; the gate is checked on the artifact as published, in bfloat16, both ways (a real merge
passes with its figures recorded, a corrupted one is refused); the memory it states is checked
against the peak RSS of a merge in a subprocess.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from mole import stream_merge as sm
from mole.merge import ParityError, ParityLimits, merge_adapter
from shared.checkpoints import METADATA_FILE, load_model

MIB = 1 << 20


def _merged_weights(folder: Path) -> dict[str, torch.Tensor]:
    weights: dict[str, torch.Tensor] = {}
    for path in folder.glob("*.safetensors"):
        weights.update(load_file(str(path)))
    return weights


@pytest.mark.parametrize(
    "options",
    [
        {"r": 4, "lora_alpha": 16, "use_rslora": True},
        {
            "r": 8,
            "lora_alpha": 8,
            "rank_pattern": {"q_proj": 4},
            "alpha_pattern": {"layers.1.self_attn.v_proj": 32},
        },
    ],
    ids=["rslora", "rank-and-alpha-patterns"],
)
def test_streaming_merge_equals_peft_merge(realformat: Path, tmp_path: Path, options: dict[str, Any]) -> None:
    from peft import LoraConfig, PeftModel, get_peft_model

    torch.manual_seed(7)
    config = LoraConfig(
        target_modules=r".*language_model.*\.(q_proj|v_proj|o_proj)",
        lora_dropout=0.0,
        init_lora_weights=False,
        **options,
    )
    get_peft_model(load_model(realformat / "base"), config).save_pretrained(str(tmp_path / "adapter"))
    sm.stream_merge(realformat / "base", tmp_path / "adapter", tmp_path / "merged", dtype="float32")

    peft_merged = PeftModel.from_pretrained(load_model(realformat / "base"), str(tmp_path / "adapter"))
    expected = peft_merged.merge_and_unload().state_dict()
    got = _merged_weights(tmp_path / "merged")
    assert set(got) == set(expected)
    base = _merged_weights(realformat / "base")
    changed = [k for k in got if not torch.equal(got[k], base[k].float())]
    assert len(changed) == 6  # q, v, o in 2 layers, of the language model only
    assert all("language_model" in k for k in changed)
    for key, tensor in got.items():
        torch.testing.assert_close(tensor, expected[key], rtol=0, atol=1e-6, msg=key)


@pytest.mark.parametrize(
    ("option", "value", "named"),
    [
        ("use_dora", True, "DoRA"),
        ("modules_to_save", ["lm_head"], "modules_to_save"),
        ("bias", "lora_only", "bias training"),
    ],
)
def test_unsupported_adapter_options_are_refused_naming_them(
    realformat: Path, tmp_path: Path, option: str, value: Any, named: str
) -> None:
    adapter = shutil.copytree(realformat / "loras/expert/adapter", tmp_path / "adapter")
    config = json.loads((adapter / "adapter_config.json").read_text())
    config[option] = value
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    out = tmp_path / "merged"
    with pytest.raises(ParityError, match=f"does not support {named}"):
        merge_adapter(realformat / "base", adapter, out)
    assert not out.exists() and not (tmp_path / "merged.staging").exists()


def test_bfloat16_merge_is_checked_as_served_and_records_its_figures(
    realformat: Path, tmp_path: Path
) -> None:
    out = tmp_path / "merged"
    out.mkdir()
    (out / "older-version").write_text("replaced")
    manifest = merge_adapter(
        realformat / "base", realformat / "loras/expert/adapter", out, keep_previous=False
    )

    assert not (tmp_path / "merged.prev").exists()  # keep_previous=False: no rollback copy
    meta = json.loads((out / METADATA_FILE).read_text())
    assert meta == json.loads(json.dumps(manifest))
    parity = meta["parity"]
    # the base's dtype by default, and the weights really are in it
    assert meta["merged"]["dtype"] == parity["dtype"] == meta["base"]["dtype"] == "bfloat16"
    assert {t.dtype for t in _merged_weights(out).values()} == {torch.bfloat16}
    assert json.loads((out / "config.json").read_text())["text_config"]["dtype"] == "bfloat16"
    assert parity["passed"]
    ref, dyn, bound = parity["merged_vs_reference"], parity["dynamic_vs_reference"], parity["allowed"]
    assert 0 < dyn["max_abs_logit_diff"] <= ref["max_abs_logit_diff"] <= bound["max_abs_logit_diff"]
    assert bound["max_abs_logit_diff"] == pytest.approx(2.0 * dyn["max_abs_logit_diff"])
    assert bound["greedy_mismatches"] == dyn["greedy_mismatches"] + 1  # one probe in 8
    assert ref["top1_mismatches"] <= bound["top1_mismatches"]
    assert parity["max_abs_logit_diff"] > 1e-3  # merged vs unmerged in bf16: the old fp32 limit would refuse
    memory = meta["memory"]
    assert memory["params"] == 19736864 and memory["merged_bytes"] == 2 * memory["params"]
    assert memory["measured_peak_rss_bytes"] >= memory["stream_measured_peak_rss_bytes"] > 0


def test_a_corrupted_bfloat16_merge_is_refused(
    realformat: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A merge that scales the deltas wrong (as a missed ``use_rslora`` or ``alpha_pattern`` would)
    still loads and answers; the gate sees it drift from the reference far beyond bf16's own drift."""
    real_scale = sm.lora_scale
    monkeypatch.setattr(sm, "lora_scale", lambda config, module: (real_scale(config, module)[0], 3.0))
    out = tmp_path / "merged"
    with pytest.raises(ParityError, match="float32 reference") as refused:
        merge_adapter(realformat / "base", realformat / "loras/expert/adapter", out)
    assert not out.exists() and not (tmp_path / "merged.staging").exists()
    figures = refused.value.parity
    assert figures["dtype"] == "bfloat16" and not figures["passed"]
    assert figures["merged_vs_reference"]["max_abs_logit_diff"] > figures["allowed"]["max_abs_logit_diff"]


def test_real_bfloat16_drift_beyond_tightened_limits_is_refused(realformat: Path, tmp_path: Path) -> None:
    with pytest.raises(ParityError, match="max logit diff to the float32 reference"):
        merge_adapter(
            realformat / "base",
            realformat / "loras/expert/adapter",
            tmp_path / "merged",
            limits=ParityLimits(logit_ratio=0.5),
        )


RSS_PROBE = """
import json, sys
from pathlib import Path
import peft, torch, transformers  # noqa: F401  (imported before measuring)
from transformers import Qwen3VLForConditionalGeneration  # noqa: F401
from mole.merge import default_probes, merge_adapter
from mole.stream_merge import plan_merge, stream_merge
from shared.checkpoints import load_processor

def vm(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024

def reset_peak():
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # resets VmHWM to the current RSS

base, adapter, out = (Path(a) for a in sys.argv[1:4])
load_processor(base), default_probes()  # tokenizer and probe images: not the merge's memory
# the kernels a merge runs, once on a tiny tensor: their code pages (~15 MB, paged in on first use,
# or not, depending on the process) are not the merge's memory either
from safetensors.torch import load_file, save_file
w = torch.ones(64, 64)
save_file({"w": (w + w @ w.T).to(torch.bfloat16)}, str(out / "warm.safetensors"))
load_file(str(out / "warm.safetensors"))["w"].float().sum()
reset_peak(); start = vm("VmRSS")
stream_merge(base, adapter, out / "stream", dtype="bfloat16")
stream = vm("VmHWM") - start
reset_peak(); start = vm("VmRSS")
manifest = merge_adapter(base, adapter, out / "merged")
print(json.dumps({"stream": stream, "merge": vm("VmHWM") - start,
                  "plan": plan_merge(base, adapter, "bfloat16").peak_bytes, "memory": manifest["memory"]}))
"""


def _can_reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


@pytest.mark.skipif(
    not _can_reset_peak_rss(), reason="needs Linux /proc/self/clear_refs to reset the peak RSS"
)
def test_merge_peak_memory_stays_within_what_it_states(realformat: Path, tmp_path: Path) -> None:
    """Peak RSS growth (VmHWM) of each phase in a fresh process against the stated need.

    The fixture's weights are 39 MB in bf16, 79 MB in fp32. The streaming merge states ~19 MB (its
    largest tensor); 16 MiB of slack covers the code pages torch touches on first use, so loading
    even one whole bf16 model would fail it. The whole merge states the float32 reference + the
    mapped checkpoint (118 MB); 64 MiB covers one probe's activations and allocator retention
    between the three models, so holding a second float32 model (+79 MB) would fail it."""
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            RSS_PROBE,
            str(realformat / "base"),
            str(realformat / "loras/expert/adapter"),
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    memory = measured["memory"]
    assert measured["plan"] == memory["stream_peak_bytes"] < 20 * MIB
    assert measured["stream"] <= memory["stream_peak_bytes"] + 16 * MIB, measured
    assert memory["parity_host_bytes"] == 4 * memory["params"] + 2 * memory["params"] + 28672
    assert measured["merge"] <= memory["parity_host_bytes"] + 64 * MIB, measured
