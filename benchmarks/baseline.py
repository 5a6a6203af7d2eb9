"""The original single-server design, reproduced in-process as the suite's baseline.

One process, one model: the base Qwen3-VL with the router LoRA and every expert LoRA loaded into one
``PeftModel``. A request is served alone, start to finish, under one lock:

1. route by generate-and-parse: ``set_adapter("router")``, greedy-generate a few tokens, parse the
   label out of the text (an unparseable answer falls back to the first label's adapter);
2. ``set_adapter(adapter)`` and generate the answer at batch size 1 with the LoRA unmerged.

It also offers the two router variants side by side (:meth:`route_generate` and
:meth:`route_forward`, the coordinator's single forward + softmax over the label tokens) and a
plain ``set_adapter`` + generate call (:meth:`generate_with`) for the mixed-adapter scenario.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from shared.mapping import MoleMapping
from shared.modeling import Generated, GenerationParams

ROUTER_ADAPTER = "router"  # adapter name of the router LoRA inside the one PeftModel
ROUTER_MAX_NEW_TOKENS = 8  # generate-and-parse budget: the label, then the end-of-turn token
_LABEL = re.compile(r"\S+")


@dataclass(frozen=True)
class BaselineAnswer:
    """One request served by the original design: the adapter it routed to and what it generated."""

    adapter: str
    label_parsed: bool  # False: the router's text held no known label (fallback adapter served)
    generated: Generated


class OriginalServer:
    """Base + router LoRA + expert LoRAs in one ``PeftModel``; one request at a time."""

    def __init__(
        self,
        mapping: MoleMapping,
        *,
        device: str,
        dtype: str,
        extra_adapters: Mapping[str, str] | None = None,
    ):
        self.mapping = mapping
        self.device = device
        self.dtype = dtype
        self.adapter_paths = {name: spec.lora for name, spec in mapping.adapters.items()}
        self.adapter_paths.update(extra_adapters or {})
        self.model: Any = None
        self.processor: Any = None
        self._lock = threading.Lock()
        self._labels = dict(mapping.router.labels)  # label token -> adapter
        self._router_text = ""
        self._label_ids: list[int] = []
        self._ordered: list[str] = mapping.router.ordered_labels()

    def load(self) -> None:
        from peft import PeftModel

        from shared.checkpoints import load_model, load_processor
        from shared.modeling import label_token_ids, render_prompt

        self.processor = load_processor(self.mapping.base_model)
        base = load_model(self.mapping.base_model, device=self.device, dtype=self.dtype)
        model = PeftModel.from_pretrained(base, self.mapping.router.adapter, adapter_name=ROUTER_ADAPTER)
        for name, path in self.adapter_paths.items():
            model.load_adapter(path, adapter_name=name)
        model.eval()
        self.model = model
        self._router_text = render_prompt(self.processor, self.mapping.router.prompt)
        self._label_ids = label_token_ids(self.processor.tokenizer, self._ordered)

    # ---- routing ---------------------------------------------------------------------------
    def route_generate(self, image: Any) -> tuple[str, bool]:
        """(adapter, parsed) by generating the router's answer and parsing the label from it."""
        from shared.modeling import generate

        self.model.set_adapter(ROUTER_ADAPTER)
        out = generate(
            self.model,
            self.processor,
            [image],
            [self._router_text],
            GenerationParams(max_new_tokens=ROUTER_MAX_NEW_TOKENS),
        )[0]
        match = _LABEL.search(out.text)
        if match is not None and match.group(0) in self._labels:
            return self._labels[match.group(0)], True
        return self._labels[self._ordered[0]], False

    def route_forward(self, image: Any) -> str:
        """The adapter chosen by one forward pass + softmax over the label tokens (mole's router)."""
        import torch

        from shared.modeling import next_token_logits

        self.model.set_adapter(ROUTER_ADAPTER)
        logits = next_token_logits(self.model, self.processor, [image], [self._router_text])
        probs = torch.softmax(logits[:, self._label_ids], dim=-1)
        return self._labels[self._ordered[int(probs.argmax(dim=-1)[0])]]

    # ---- generation ------------------------------------------------------------------------
    def generate_with(self, adapter: str, image: Any, prompt: str, max_new_tokens: int) -> Generated:
        """``set_adapter(adapter)`` then generate one answer at batch size 1 (serialised)."""
        from shared.modeling import generate, render_prompt

        spec = self.mapping.adapters.get(adapter)
        text = render_prompt(self.processor, prompt, spec.system_prompt if spec else None)
        with self._lock:
            self.model.set_adapter(adapter)
            return generate(
                self.model, self.processor, [image], [text], GenerationParams(max_new_tokens=max_new_tokens)
            )[0]

    def handle(self, image: Any, prompt: str, max_new_tokens: int) -> BaselineAnswer:
        """One request of the original design: route by generate-and-parse, then serve it."""
        from shared.modeling import generate, render_prompt

        with self._lock:
            adapter, parsed = self.route_generate(image)
            spec = self.mapping.adapters.get(adapter)
            text = render_prompt(self.processor, prompt, spec.system_prompt if spec else None)
            self.model.set_adapter(adapter)
            out = generate(
                self.model, self.processor, [image], [text], GenerationParams(max_new_tokens=max_new_tokens)
            )[0]
        return BaselineAnswer(adapter, parsed, out)
