"""``mole demo-assets``: build the embedded default model set with no network.

A tiny Qwen3-VL (tokenizer, image processor, chat template, weights) saved with
``save_pretrained``; a router LoRA and one LoRA per expert briefly trained on the synthetic
screenshot task (:mod:`mole.synthetic`); merged checkpoints of the hot experts made through the
merge pipeline; and ``expert_machine_mapping.json`` with loopback URLs. Everything is seeded; a
finished build leaves ``assets.json`` and a second run with the same recipe returns at once.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mole import synthetic
from shared.mapping import current_keys

logger = logging.getLogger(__name__)

RECIPE_VERSION = 2  # bump when anything below changes the built assets
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
# Qwen-style chat template: system/user/assistant turns, images as vision placeholders.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
ROUTER_PROMPT = "Which expert should handle this screen?"
LORA_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
HOT_EXPERTS = ("calendar", "claim")  # served by merged workers
BASE_PORT = 8700  # coordinator; workers follow


@dataclass
class Recipe:
    """Everything that determines the built assets (hashed into the cache key)."""

    version: int = RECIPE_VERSION
    seed: int = 0
    text_hidden: int = 64  # language model width
    text_layers: int = 2  # decoder layers
    head_dim: int = 32  # attention head size: vLLM's CPU attention refuses 16 (the first recipe's)
    kv_heads: int = 1  # key/value heads (grouped-query attention over text_hidden // head_dim heads)
    vision_hidden: int = 32  # vision tower width
    vision_depth: int = 2  # vision blocks
    max_pixels: int = 128 * 128  # image processor resize cap: 64 patches of 16 px, 16 image tokens
    lora_rank: int = 16
    router_steps: int = 80
    router_scales: tuple[float, ...] = (
        1.0,
        0.75,
    )  # screen sizes the router learns: it routes at smaller budgets too
    expert_steps: int = 320
    batch_size: int = 16
    lr: float = 3e-3
    train_samples: int = 256
    heldout_samples: int = 64
    experts: tuple[str, ...] = synthetic.KINDS


@dataclass
class BuildReport:
    out: str
    seconds: float
    router_heldout_accuracy: float
    expert_format_accuracy: dict[str, float] = field(default_factory=dict)
    expert_exact_accuracy: dict[str, float] = field(default_factory=dict)
    merges: dict[str, dict] = field(default_factory=dict)


def build_tokenizer(corpus: Sequence[str]) -> Any:
    """A byte-level BPE tokenizer made in code, wrapped as Qwen's tokenizer class, digits single tokens."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r"\p{N}"), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=700,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(corpus, trainer)
    spec = json.loads(bpe.to_str())
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in spec["model"]["merges"]]
    tokenizer = Qwen2Tokenizer(
        vocab=spec["model"]["vocab"],
        merges=merges,  # type: ignore[arg-type]  # tokenizers' merges are pairs
        unk_token=None,  # type: ignore[arg-type]  # byte-level BPE needs no unknown token
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
    )
    tokenizer.add_special_tokens({"additional_special_tokens": list(SPECIAL_TOKENS[1:])})
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tokenizer_corpus(repeat: int = 20) -> list[str]:
    """The text the demo tokenizer's BPE is trained on: prompts, answers, digits."""
    lines = [ROUTER_PROMPT, *synthetic.PROMPTS, "system user assistant", "0 1 2 3 4 5 6 7 8 9"]
    for expert in synthetic.KINDS:
        for color in synthetic.COLORS:
            lines.append(synthetic.expected_output(expert, color))
    return lines * repeat


def build_base(out: Path, recipe: Recipe) -> None:
    """Save a randomly initialised tiny Qwen3-VL with its processor files to ``out``."""
    import torch
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tokenizer = build_tokenizer(tokenizer_corpus())
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=16,
        temporal_patch_size=2,
        merge_size=2,
        min_pixels=32 * 32,
        max_pixels=recipe.max_pixels,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    ids = tokenizer.convert_tokens_to_ids
    head_dim = recipe.head_dim
    half = head_dim // 2  # mrope_section splits head_dim / 2 rotary pairs into (t, h, w) sections
    mrope_section = [half // 4, (half - half // 4) // 2, half - half // 4 - (half - half // 4) // 2]
    config = Qwen3VLConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": recipe.text_hidden,
            "intermediate_size": recipe.text_hidden * 2,
            "num_hidden_layers": recipe.text_layers,
            "num_attention_heads": recipe.text_hidden // head_dim,
            "num_key_value_heads": recipe.kv_heads,
            "head_dim": head_dim,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 10000.0,
                "mrope_section": mrope_section,  # [4, 6, 6] for head_dim 32
                "mrope_interleaved": True,
            },
            "initializer_range": 0.15,  # tiny models need a wide init or a LoRA cannot move the logits
            "max_position_embeddings": 1024,
            "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config={
            "depth": recipe.vision_depth,
            "hidden_size": recipe.vision_hidden,
            "intermediate_size": recipe.vision_hidden * 2,
            "num_heads": 2,
            "patch_size": 16,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "out_hidden_size": recipe.text_hidden,
            "num_position_embeddings": 64,
            "deepstack_visual_indexes": [recipe.vision_depth - 1],
            "initializer_range": 0.15,
        },
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=False,
    )
    torch.manual_seed(recipe.seed)
    model = Qwen3VLForConditionalGeneration(config)
    model.generation_config.eos_token_id = [ids("<|im_end|>"), ids("<|endoftext|>")]
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.do_sample = False
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    image_processor.save_pretrained(out)


def _training_batch(processor: Any, rows: Sequence[tuple[Any, str, str]], device: str) -> dict:
    """Tokenize (image, templated prompt, answer) rows; labels cover the answer and its end token only."""

    tokenizer = processor.tokenizer
    end = "<|im_end|>"
    texts = [prompt + answer + end for _, prompt, answer in rows]
    prompt_lens = [len(processor(text=[p], images=[img])["input_ids"][0]) for img, p, _ in rows]
    tokenizer.padding_side = "right"
    try:
        batch = processor(text=texts, images=[img for img, _, _ in rows], return_tensors="pt", padding=True)
    finally:
        tokenizer.padding_side = "left"
    labels = batch["input_ids"].clone()
    for i, n in enumerate(prompt_lens):
        labels[i, :n] = -100
    labels[batch["attention_mask"] == 0] = -100
    batch["labels"] = labels
    return {k: v.to(device) for k, v in batch.items()}


def router_rows(samples: Sequence[synthetic.Sample], scales: Sequence[float]) -> list[tuple[Any, str, str]]:
    """The router's training rows: every screen at every scale, with its label."""
    return [
        (
            s.image if k == 1.0 else s.image.resize((int(s.image.width * k), int(s.image.height * k))),
            ROUTER_PROMPT,
            s.label,
        )
        for k in scales
        for s in samples
    ]


def train_lora(
    base: Path,
    out: Path,
    rows: Sequence[tuple[Any, str, str]],
    recipe: Recipe,
    steps: int,
    seed: int,
) -> None:
    """Train a LoRA on ``rows`` of (image, user prompt, answer) and save the adapter to ``out``."""
    import torch
    from peft import LoraConfig, get_peft_model

    from shared.checkpoints import load_model, load_processor
    from shared.modeling import render_prompt

    torch.manual_seed(seed)
    processor = load_processor(base)
    model = load_model(base)
    config = LoraConfig(
        r=recipe.lora_rank,
        lora_alpha=recipe.lora_rank * 2,
        lora_dropout=0.0,
        target_modules=LORA_TARGETS,
        bias="none",
    )
    model = get_peft_model(model, config)
    model.train()
    templated = [(img, render_prompt(processor, prompt), answer) for img, prompt, answer in rows]
    batches = [
        _training_batch(processor, templated[i : i + recipe.batch_size], "cpu")
        for i in range(0, len(templated), recipe.batch_size)
    ]
    params = [p for p in model.parameters() if p.requires_grad]
    optim = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(optim, max_lr=recipe.lr, total_steps=steps, pct_start=0.1)
    order = random.Random(seed)
    for step in range(steps):
        batch = batches[order.randrange(len(batches))]
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optim.step()
        sched.step()
        optim.zero_grad(set_to_none=True)
        if step % 40 == 0 or step == steps - 1:
            logger.info("  %s step %d/%d loss %.4f", out.parent.name, step + 1, steps, loss.item())
    model.save_pretrained(str(out))


def evaluate_router(base: Path, adapter: Path, samples: Sequence[synthetic.Sample]) -> float:
    """Held-out accuracy of the router LoRA: one forward, argmax over the label tokens."""
    from peft import PeftModel

    from shared.checkpoints import load_model, load_processor
    from shared.modeling import label_token_ids, next_token_logits, render_prompt

    processor = load_processor(base)
    model = PeftModel.from_pretrained(load_model(base), str(adapter))
    labels = [str(i) for i in range(len(synthetic.KINDS))]
    ids = label_token_ids(processor.tokenizer, labels)
    correct = 0
    for i in range(0, len(samples), 16):
        chunk = samples[i : i + 16]
        texts = [render_prompt(processor, ROUTER_PROMPT) for _ in chunk]
        logits = next_token_logits(model, processor, [s.image for s in chunk], texts)
        picks = logits[:, ids].argmax(dim=-1).tolist()
        correct += sum(labels[p] == s.label for p, s in zip(picks, chunk, strict=True))
    return correct / len(samples)


def evaluate_expert(
    base: Path, adapter: Path, expert: str, samples: Sequence[synthetic.Sample]
) -> tuple[float, float]:
    """(format accuracy, exact accuracy) of an expert LoRA's greedy outputs on ``samples``."""
    from peft import PeftModel

    from shared.checkpoints import load_model, load_processor
    from shared.modeling import GenerationParams, generate, render_prompt

    processor = load_processor(base)
    model = PeftModel.from_pretrained(load_model(base), str(adapter))
    fmt = exact = 0
    for i in range(0, len(samples), 16):
        chunk = samples[i : i + 16]
        texts = [render_prompt(processor, s.prompt) for s in chunk]
        outs = generate(
            model, processor, [s.image for s in chunk], texts, GenerationParams(max_new_tokens=16)
        )
        for out, s in zip(outs, chunk, strict=True):
            fmt += bool(synthetic.EXPERT_FORMATS[expert].match(out.text))
            exact += out.text == synthetic.expected_output(expert, s.color)
    return fmt / len(samples), exact / len(samples)


def write_demo_mapping(out: Path, recipe: Recipe, base_port: int = BASE_PORT) -> Path:
    """The demo ``expert_machine_mapping.json``: one merged worker per hot expert, one dynamic worker."""
    experts = list(recipe.experts)
    workers: list[dict[str, Any]] = []
    port = base_port + 1
    for name in HOT_EXPERTS:
        workers.append(
            {
                "id": f"merged-{name}",
                "url": f"http://127.0.0.1:{port}",
                "mode": "merged",
                "adapters": [name],
                "model": f"merged/{name}",
            }
        )
        port += 1
    workers.append(
        {
            "id": "dynamic-0",
            "url": f"http://127.0.0.1:{port}",
            "mode": "dynamic",
            "adapters": experts,
            "model": None,
        }
    )
    mapping = {
        "version": 1,
        "base_model": "base",
        "coordinator": {"url": f"http://127.0.0.1:{base_port}"},
        "router": {
            "adapter": "loras/router/adapter",
            "prompt": ROUTER_PROMPT,
            "labels": {str(i): name for i, name in enumerate(experts)},
        },
        "adapters": {
            name: {
                "label": str(i),
                "lora": f"loras/{name}/adapter",
                "hot": name in HOT_EXPERTS,
                "merged": f"merged/{name}" if name in HOT_EXPERTS else None,
                "max_new_tokens": 16,
                "description": f"synthetic {name} screenshots",
            }
            for i, name in enumerate(experts)
        },
        "workers": workers,
        "dispatch": {"prefer_merged": True, "fallback_to_dynamic": True},
    }
    path = out / "expert_machine_mapping.json"
    path.write_text(json.dumps(mapping, indent=2) + "\n")
    return path


MANY_LABELS_VERSION = 1  # bump when the many-label router's recipe changes
MANY_LABELS_STEPS = 240  # training steps of the many-label router


def many_labels() -> list[str]:
    """The many-label demo router's labels: one per (screen kind, accent colour), e.g.
    ``"calendar-red"``: 16 labels of several tokens each, aliases of the four experts."""
    return [f"{kind}-{color}" for kind in synthetic.KINDS for color in synthetic.COLORS]


def build_many_label_router(assets: Path, out: Path, *, log: Callable[[str], None] = print) -> Path:
    """A router trained on :func:`many_labels` over the demo base, in its own cached folder
    ``out`` (the demo recipe is untouched), and ``out/mapping.json``: every label an alias adapter
    of its kind's expert LoRA, all held by one dynamic worker. Returns the mapping's path.

    Used to prove that the router scores multi-token labels and more than ten of them.
    """
    out = Path(out).resolve()
    stamp = out / "assets.json"
    key = {
        "version": MANY_LABELS_VERSION,
        "steps": MANY_LABELS_STEPS,
        "labels": many_labels(),
        "demo": json.loads((Path(assets) / "assets.json").read_text())["recipe"],
    }
    mapping = out / "mapping.json"
    if stamp.is_file() and json.loads(stamp.read_text()).get("key") == key:
        return mapping
    if out.exists():
        shutil.rmtree(out)
    recipe = Recipe()
    base = Path(assets).resolve() / "base"
    train = synthetic.make_samples(recipe.train_samples, seed=recipe.seed + 1)
    log(f"training a {len(key['labels'])}-label router ({MANY_LABELS_STEPS} steps)")
    router = out / "router" / "adapter"
    rows = [(s.image, ROUTER_PROMPT, f"{s.kind}-{s.color}") for s in train]
    train_lora(base, router, rows, recipe, MANY_LABELS_STEPS, recipe.seed + 30)
    adapters = {
        label: {
            "label": label,
            "lora": str(Path(assets).resolve() / "loras" / label.split("-")[0] / "adapter"),
        }
        for label in many_labels()
    }
    doc = {
        "version": 1,
        "base_model": str(base),
        "coordinator": {"url": f"http://127.0.0.1:{BASE_PORT}"},
        "router": {"adapter": str(router), "prompt": ROUTER_PROMPT, "labels": {a: a for a in adapters}},
        "adapters": adapters,
        "workers": [
            {
                "id": "dynamic-0",
                "url": f"http://127.0.0.1:{BASE_PORT + 1}",
                "mode": "dynamic",
                "adapters": list(adapters),
            }
        ],
    }
    mapping.write_text(json.dumps(doc, indent=2) + "\n")
    stamp.write_text(json.dumps({"key": key}, indent=2) + "\n")
    return mapping


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (for copies of the demo mapping in tests and benchmarks)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def relocated_mapping(assets: Path, out: Path, **top: Any) -> Path:
    """Write the demo mapping to the file ``out`` with absolute paths into ``assets`` and fresh
    loopback ports, so several stacks can run side by side. Old key names are renamed to today's
    (assets built before the rename), then ``top`` replaces top-level keys."""

    def absolute(value: Any) -> Any:
        if isinstance(value, str) and not value.startswith("/") and "://" not in value:
            return str(Path(assets).resolve() / value)
        return value

    doc = current_keys(json.loads((Path(assets) / "expert_machine_mapping.json").read_text()))
    doc["base_model"] = absolute(doc["base_model"])
    doc["router"]["adapter"] = absolute(doc["router"]["adapter"])
    for spec in doc["adapters"].values():
        for key in ("lora", "merged"):
            if spec.get(key):
                spec[key] = absolute(spec[key])
    for worker in doc["workers"]:
        for key in ("model", "discover"):
            if worker.get(key):
                worker[key] = absolute(worker[key])
        worker["url"] = f"http://127.0.0.1:{free_port()}"
    doc["coordinator"]["url"] = f"http://127.0.0.1:{free_port()}"
    doc.update(top)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2))
    return out


def build_demo_assets(
    out: Path, recipe: Recipe | None = None, *, force: bool = False, log: Callable[[str], None] = print
) -> BuildReport:
    """Build (or reuse) the demo asset set under ``out``; returns the build report."""
    import torch

    from mole.merge import merge_adapter

    recipe = recipe or Recipe()
    out = Path(out).resolve()
    stamp = out / "assets.json"
    key = json.loads(json.dumps(asdict(recipe)))
    if stamp.exists() and not force:
        saved = json.loads(stamp.read_text())
        if saved.get("recipe") == key:
            log(f"demo assets up to date in {out}")
            return BuildReport(**saved["report"])
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    t0 = time.perf_counter()
    base = out / "base"
    log("building tiny Qwen3-VL base (tokenizer, processor, weights)")
    build_base(base, recipe)

    train = synthetic.make_samples(recipe.train_samples, seed=recipe.seed + 1)
    heldout = synthetic.make_samples(recipe.heldout_samples, seed=recipe.seed + 2)

    log(f"training router LoRA ({recipe.router_steps} steps)")
    router = out / "loras" / "router" / "adapter"
    train_lora(
        base,
        router,
        router_rows(train, recipe.router_scales),
        recipe,
        recipe.router_steps,
        recipe.seed + 10,
    )
    report = BuildReport(out=str(out), seconds=0.0, router_heldout_accuracy=0.0)
    report.router_heldout_accuracy = evaluate_router(base, router, heldout)
    log(f"router held-out accuracy: {report.router_heldout_accuracy:.1%} on {len(heldout)} samples")

    for i, expert in enumerate(recipe.experts):
        log(f"training expert LoRA {expert!r} ({recipe.expert_steps} steps)")
        adapter = out / "loras" / expert / "adapter"
        rows = [(s.image, s.prompt, synthetic.expected_output(expert, s.color)) for s in train]
        train_lora(base, adapter, rows, recipe, recipe.expert_steps, recipe.seed + 20 + i)
        fmt, exact = evaluate_expert(base, adapter, expert, heldout)
        report.expert_format_accuracy[expert] = fmt
        report.expert_exact_accuracy[expert] = exact
        log(f"  {expert}: format {fmt:.1%}, exact {exact:.1%} on held-out screens")

    for expert in HOT_EXPERTS:
        log(f"merging {expert!r} (float32 merge + parity gate)")
        manifest = merge_adapter(base, out / "loras" / expert / "adapter", out / "merged" / expert)
        report.merges[expert] = manifest["parity"]

    write_demo_mapping(out, recipe)
    report.seconds = round(time.perf_counter() - t0, 1)
    stamp.write_text(json.dumps({"recipe": key, "report": asdict(report)}, indent=2) + "\n")
    log(f"demo assets built in {report.seconds:.0f}s: {out}")
    return report
