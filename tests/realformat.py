"""A tiny checkpoint laid out like the real ``Qwen/Qwen3-VL-8B-Instruct`` folder (test support).

The demo assets are saved by today's transformers, so they never show mole the files a real download
holds. This builder writes those files in the format the hub repo ships them (transformers 4.57
era): ``config.json`` with ``text_config``/``vision_config`` nesting, ``rope_scaling`` with
``mrope_section`` and the real token ids; ``generation_config.json``; ``preprocessor_config.json``
naming ``Qwen2VLImageProcessorFast`` and ``video_preprocessor_config.json``; a byte-level BPE
tokenizer (``tokenizer.json``, ``vocab.json``, ``merges.txt``, ``tokenizer_config.json``) with the
real Qwen special tokens at their real ids; weights in bfloat16, sharded, with
``model.safetensors.index.json``. Only the sizes are tiny (hidden 64, 2 heads of 32, 1 KV head,
2 layers, a 2-block vision tower); the vocabulary keeps the real 151936 rows.

Everything is made locally and seeded; nothing is downloaded. A finished build leaves
``realformat.json`` and is reused while :data:`RECIPE` is unchanged.

Layouts (same weights, hard-linked): ``base`` keeps the chat template in ``chat_template.json`` and
in ``tokenizer_config.json``; ``template-json``, ``template-jinja`` and ``template-tokenizer`` keep
it in exactly one of ``chat_template.json``, ``chat_template.jinja`` and ``tokenizer_config.json``.
``loras/expert`` is a random (non-zero) LoRA on the language model's projections, ``loras/router``
one for the router.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

RECIPE: dict[str, Any] = {"version": 1, "seed": 0, "lora_rank": 8, "max_shard_size": "16MB"}
TEMPLATE_LAYOUTS = {
    "base": ("chat_template.json", "tokenizer_config.json"),
    "template-json": ("chat_template.json",),
    "template-jinja": ("chat_template.jinja",),
    "template-tokenizer": ("tokenizer_config.json",),
}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".safetensors.index.json", ".bin.index.json")
LORA_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj)"

# ---- the real files' contents (sizes shrunk where marked "tiny") --------------------------------
REAL_VOCAB_SIZE = 151936  # text_config.vocab_size: embedding rows (ids past the tokenizer are padding)
FIRST_SPECIAL_ID = 151643  # <|endoftext|>; the BPE vocabulary fills ids 0..151642
# Qwen2/Qwen3 added tokens in id order from 151643; True: special (skipped when decoding).
SPECIAL_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
    ("<tool_response>", False),
    ("</tool_response>", False),
    ("<think>", False),
    ("</think>", False),
)
TOKEN_IDS = {token: FIRST_SPECIAL_ID + i for i, (token, _) in enumerate(SPECIAL_TOKENS)}
# The Qwen2 pre-tokenizer split (digits are single tokens, so router labels "0".."9" are one token).
QWEN_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"

CONFIG: dict[str, Any] = {
    "architectures": ["Qwen3VLForConditionalGeneration"],
    "image_token_id": TOKEN_IDS["<|image_pad|>"],  # 151655
    "model_type": "qwen3_vl",
    "text_config": {
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": TOKEN_IDS["<|endoftext|>"],  # 151643
        "dtype": "bfloat16",
        "eos_token_id": TOKEN_IDS["<|im_end|>"],  # 151645
        "head_dim": 32,  # tiny (real: 128)
        "hidden_act": "silu",
        "hidden_size": 64,  # tiny (real: 4096)
        "initializer_range": 0.02,
        "intermediate_size": 128,  # tiny (real: 12288)
        "max_position_embeddings": 262144,
        "model_type": "qwen3_vl_text",
        "num_attention_heads": 2,  # tiny (real: 32)
        "num_hidden_layers": 2,  # tiny (real: 36)
        "num_key_value_heads": 1,  # tiny (real: 8)
        "rms_norm_eps": 1e-06,
        # mrope_section sums to head_dim / 2, as the real [24, 20, 20] does for 128
        "rope_scaling": {"mrope_interleaved": True, "mrope_section": [6, 5, 5], "rope_type": "default"},
        "rope_theta": 5000000,
        "use_cache": True,
        "vocab_size": REAL_VOCAB_SIZE,
    },
    "tie_word_embeddings": False,
    "transformers_version": "4.57.0.dev0",
    "video_token_id": TOKEN_IDS["<|video_pad|>"],  # 151656
    "vision_config": {
        "deepstack_visual_indexes": [0, 1],  # tiny (real: [8, 16, 24])
        "depth": 2,  # tiny (real: 27)
        "hidden_act": "gelu_pytorch_tanh",
        "hidden_size": 32,  # tiny (real: 1152)
        "in_channels": 3,
        "initializer_range": 0.02,
        "intermediate_size": 64,  # tiny (real: 4304)
        "model_type": "qwen3_vl",
        "num_heads": 2,  # tiny (real: 16)
        "num_position_embeddings": 2304,
        "out_hidden_size": 64,  # = text hidden_size (real: 4096)
        "patch_size": 16,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
    },
    "vision_end_token_id": TOKEN_IDS["<|vision_end|>"],  # 151653
    "vision_start_token_id": TOKEN_IDS["<|vision_start|>"],  # 151652
}
GENERATION_CONFIG: dict[str, Any] = {
    "bos_token_id": 151643,
    "pad_token_id": 151643,
    "do_sample": True,
    "eos_token_id": [151645, 151643],
    "top_k": 20,
    "top_p": 0.8,
    "repetition_penalty": 1.0,
    "temperature": 0.7,
    "transformers_version": "4.56.0",
}
PREPROCESSOR_CONFIG: dict[str, Any] = {
    "size": {"longest_edge": 16777216, "shortest_edge": 65536},
    "patch_size": 16,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
    "processor_class": "Qwen3VLProcessor",
    "image_processor_type": "Qwen2VLImageProcessorFast",
}
VIDEO_PREPROCESSOR_CONFIG: dict[str, Any] = {
    "size": {"longest_edge": 25165824, "shortest_edge": 4096},
    "patch_size": 16,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
    "processor_class": "Qwen3VLProcessor",
    "video_processor_type": "Qwen3VLVideoProcessor",
}
# The Qwen3-VL Instruct chat template (system/user/assistant/tool turns, tools, vision placeholders).
CHAT_TEMPLATE = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0].role == 'system' %}
        {%- if messages[0].content is string %}
            {{- messages[0].content }}
        {%- else %}
            {%- for content in messages[0].content %}
                {%- if 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '\\n\\n' }}
    {%- endif %}
    {{- "# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\\n' }}
        {%- if messages[0].content is string %}
            {{- messages[0].content }}
        {%- else %}
            {%- for content in messages[0].content %}
                {%- if 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- set image_count = namespace(value=0) %}
{%- set video_count = namespace(value=0) %}
{%- for message in messages %}
    {%- if message.role == "user" %}
        {{- '<|im_start|>' + message.role + '\\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
            {%- for content in message.content %}
                {%- if content.type == 'image' or 'image' in content or 'image_url' in content %}
                    {%- set image_count.value = image_count.value + 1 %}
                    {%- if add_vision_id %}
                        {{- 'Picture ' ~ image_count.value ~ ': ' }}
                    {%- endif -%}
                    {{- '<|vision_start|><|image_pad|><|vision_end|>' }}
                {%- elif content.type == 'video' or 'video' in content %}
                    {%- set video_count.value = video_count.value + 1 %}
                    {%- if add_vision_id %}
                        {{- 'Video ' ~ video_count.value ~ ': ' }}
                    {%- endif -%}
                    {{- '<|vision_start|><|video_pad|><|vision_end|>' }}
                {%- elif 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role + '\\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
            {%- for content_item in message.content %}
                {%- if 'text' in content_item %}
                    {{- content_item.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and message.content) or (not loop.first) %}
                    {{- '\\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
            {%- for content in message.content %}
                {%- if content.type == 'image' or 'image' in content or 'image_url' in content %}
                    {%- set image_count.value = image_count.value + 1 %}
                    {%- if add_vision_id %}
                        {{- 'Picture ' ~ image_count.value ~ ': ' }}
                    {%- endif -%}
                    {{- '<|vision_start|><|image_pad|><|vision_end|>' }}
                {%- elif content.type == 'video' or 'video' in content %}
                    {%- set video_count.value = video_count.value + 1 %}
                    {%- if add_vision_id %}
                        {{- 'Video ' ~ video_count.value ~ ': ' }}
                    {%- endif -%}
                    {{- '<|vision_start|><|video_pad|><|vision_end|>' }}
                {%- elif 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""


def tokenizer_config(*, with_template: bool) -> dict[str, Any]:
    """``tokenizer_config.json`` as the hub repo has it (transformers 4.x format)."""
    doc: dict[str, Any] = {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": {
            str(TOKEN_IDS[token]): {
                "content": token,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": special,
            }
            for token, special in SPECIAL_TOKENS
        },
        "additional_special_tokens": [t for t, _ in SPECIAL_TOKENS[1:14]],
        "bos_token": None,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "extra_special_tokens": {},
        "model_max_length": 262144,
        "pad_token": "<|endoftext|>",
        "processor_class": "Qwen3VLProcessor",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    if with_template:
        doc["chat_template"] = CHAT_TEMPLATE
    return doc


# ---- building ------------------------------------------------------------------------------------
def write_tokenizer(out: Path) -> None:
    """A byte-level BPE with Qwen2's pipeline, padded so the real special tokens sit at their real ids."""
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )

    from mole.demo_assets import tokenizer_corpus

    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=600, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    bpe.train_from_iterator(tokenizer_corpus(10), trainer)
    spec = json.loads(bpe.to_str())
    vocab: dict[str, int] = spec["model"]["vocab"]
    # Unreachable placeholders (no merge makes them) fill the ids up to the first special token.
    for i in range(len(vocab), FIRST_SPECIAL_ID):
        vocab[f"<extra_{i}>"] = i
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in spec["model"]["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.normalizer = bpe.normalizer
    tok.pre_tokenizer = bpe.pre_tokenizer
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tok.add_special_tokens(
        [AddedToken(t, special=special, normalized=False) for t, special in SPECIAL_TOKENS]
    )
    for token, tid in TOKEN_IDS.items():
        if tok.token_to_id(token) != tid:
            raise AssertionError(f"{token} got id {tok.token_to_id(token)}, expected {tid}")
    tok.save(str(out / "tokenizer.json"))
    tok.model.save(str(out))  # vocab.json, merges.txt


def _write_json(path: Path, doc: Any) -> None:
    path.write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n")


def write_weights(out: Path, seed: int, max_shard_size: str) -> None:
    """Random weights for :data:`CONFIG`, saved in bfloat16 and sharded like the hub's."""
    import torch
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Writing model shards" would flood the test output
    torch.manual_seed(seed)
    config = Qwen3VLConfig.from_dict(json.loads(json.dumps(CONFIG)))
    # A wide init: at 0.02 a 64-wide random model's logits are nearly flat and a LoRA barely moves them.
    config.text_config.initializer_range = 0.15
    config.vision_config.initializer_range = 0.15
    model = Qwen3VLForConditionalGeneration(config).to(torch.bfloat16)
    staging = out / ".weights"
    model.save_pretrained(staging, max_shard_size=max_shard_size)
    for path in staging.iterdir():
        if path.name.endswith(WEIGHT_SUFFIXES):
            path.rename(out / path.name)
    shutil.rmtree(staging)


def write_base(out: Path, seed: int, max_shard_size: str) -> None:
    out.mkdir(parents=True)
    write_weights(out, seed, max_shard_size)
    _write_json(out / "config.json", CONFIG)
    _write_json(out / "generation_config.json", GENERATION_CONFIG)
    _write_json(out / "preprocessor_config.json", PREPROCESSOR_CONFIG)
    _write_json(out / "video_preprocessor_config.json", VIDEO_PREPROCESSOR_CONFIG)
    write_tokenizer(out)
    (out / "README.md").write_text("---\nlicense: apache-2.0\npipeline_tag: image-text-to-text\n---\n")


def place_template(folder: Path, places: tuple[str, ...]) -> None:
    """Keep the chat template exactly in ``places`` (of chat_template.json/.jinja, tokenizer_config.json)."""
    _write_json(
        folder / "tokenizer_config.json", tokenizer_config(with_template="tokenizer_config.json" in places)
    )
    for name in ("chat_template.json", "chat_template.jinja"):
        (folder / name).unlink(missing_ok=True)
    if "chat_template.json" in places:
        _write_json(folder / "chat_template.json", {"chat_template": CHAT_TEMPLATE})
    if "chat_template.jinja" in places:
        (folder / "chat_template.jinja").write_text(CHAT_TEMPLATE)


def _copy_checkpoint(src: Path, dst: Path) -> None:
    """Copy a checkpoint folder, hard-linking the (read-only) weights to save disk."""
    dst.mkdir(parents=True)
    for path in src.iterdir():
        if path.name.endswith(WEIGHT_SUFFIXES):
            try:
                os.link(path, dst / path.name)
                continue
            except OSError:
                pass
        shutil.copy2(path, dst / path.name)


def write_lora(base: Path, out: Path, seed: int, rank: int) -> None:
    """A random LoRA (``init_lora_weights=False``: B is not zero, so it changes the outputs)."""
    import torch
    from peft import LoraConfig, get_peft_model

    from shared.checkpoints import load_model

    torch.manual_seed(seed)
    config = LoraConfig(
        r=rank, lora_alpha=rank, target_modules=LORA_TARGETS, lora_dropout=0.0, init_lora_weights=False
    )
    model = get_peft_model(load_model(base), config)
    model.save_pretrained(str(out))
    # as an adapter trained on the hub model records it (the build folder is renamed afterwards)
    adapter_config = json.loads((out / "adapter_config.json").read_text())
    adapter_config["base_model_name_or_path"] = "Qwen/Qwen3-VL-8B-Instruct"
    _write_json(out / "adapter_config.json", adapter_config)


def build_realformat(root: Path) -> Path:
    """Build (or reuse) the real-format checkpoint set under ``root``; returns ``root``."""
    root = Path(root).resolve()
    stamp = root / "realformat.json"
    if stamp.exists() and json.loads(stamp.read_text()) == RECIPE:
        return root
    # Built beside the cache and renamed into place, so no reader sees a half-built set.
    work = root.with_name(f"{root.name}.building-{os.getpid()}")
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    base = work / "base"
    write_base(base, RECIPE["seed"], RECIPE["max_shard_size"])
    for layout, places in TEMPLATE_LAYOUTS.items():
        if layout != "base":
            _copy_checkpoint(base, work / layout)
        place_template(work / layout, places)
    write_lora(base, work / "loras" / "expert" / "adapter", RECIPE["seed"] + 1, RECIPE["lora_rank"])
    write_lora(base, work / "loras" / "router" / "adapter", RECIPE["seed"] + 2, RECIPE["lora_rank"])
    _write_json(work / stamp.name, RECIPE)
    if root.exists():
        shutil.rmtree(root)
    work.rename(root)
    return root


def non_weight_files(folder: Path) -> set[str]:
    """Names of the top-level files of a checkpoint folder that are not weights."""
    return {p.name for p in folder.iterdir() if p.is_file() and not p.name.endswith(WEIGHT_SUFFIXES)}
