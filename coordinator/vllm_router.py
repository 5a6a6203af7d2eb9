"""``VllmRouter``: the router LoRA run by a vLLM worker (mapping ``router.served_by``), so the
coordinator loads no model (it needs no GPU).

The worker serves the router LoRA as :data:`~shared.mapping.ROUTER_MODEL_NAME` next to the experts
(:func:`shared.mapping.engines.vllm_loras`). Per routed image, the labels' log-probabilities come
from vLLM's public chat API, the same quantities the local router computes (``score_labels``):

- one request with ``max_tokens`` 1, ``logprobs`` and ``logprob_token_ids`` = every label's first
  token: a single-token label's log-probability;
- for labels of several tokens, one more such request per distinct label start (the start written
  as the assistant's answer, ``continue_final_message``), asking for the tokens that follow it;
  a label's log-probability is the sum over its tokens (the rendered prompt is checked to end
  with the label start's tokens, so a template that tokenizes it differently is an error, not a
  wrong score). Not ``prompt_logprobs``: see :func:`~coordinator.vllm_api.next_token_logprobs`.

Then a softmax over the labels, as locally. The image goes as received (base64); its budget is the
router's ``max_pixels`` (``mm_processor_kwargs``, which mole's vLLM workers accept from the
coordinator). A router worker that fails or does not answer in time is :class:`RouterUnavailable`
(503); requests naming their expert do not need it.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import time
from typing import Any

import httpx

from coordinator.router import RouterConfig, RouteScores
from coordinator.vllm_api import LogprobsFailed, data_url, next_token_logprobs
from shared.errors import RouterUnavailable
from shared.mapping import ROUTER_MODEL_NAME, MoleMapping, RouterSpec
from shared.mapping.engines import vllm_image_size
from shared.settings import Settings

logger = logging.getLogger(__name__)


@functools.lru_cache(maxsize=16)
def _image_size(base_model: str, max_pixels: int | None) -> dict[str, int] | None:
    """The router's image size for vLLM, read from the checkpoint once, not per routed image. Always
    sent: the worker's own budget (its ``--mm-processor-kwargs``) must not apply to routing."""
    return vllm_image_size(base_model, max_pixels, None, always=True)


class VllmRouter:
    """The router of a mapping with ``router.served_by``. ``load()`` is blocking (a tokenizer and
    the adapter's hash, no model); call it off the event loop."""

    def __init__(
        self, mapping: MoleMapping, settings: Settings, client: httpx.AsyncClient, token: str | None
    ):
        assert mapping.router.served_by is not None
        worker = mapping.worker(mapping.router.served_by)
        self.worker_id = worker.id
        self.url = worker.url
        self.base_model = mapping.base_model
        self.adapter = mapping.router.adapter
        self.device = f"vllm:{worker.id}"
        self.version = ""
        self._settings = settings
        self._client = client
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._tokenizer: Any = None

    def load(self) -> None:
        """The base model's tokenizer (the labels' token ids) and the router adapter's hash."""
        from transformers import AutoTokenizer

        from shared.checkpoints import weights_hash

        self._tokenizer = AutoTokenizer.from_pretrained(self.base_model)
        self.version = weights_hash(self.adapter)
        logger.info("router served by vLLM worker", extra={"worker_id": self.worker_id})

    def stop(self, timeout: float = 10.0) -> None:
        """Nothing to release: the worker's client belongs to the coordinator."""

    @property
    def loaded(self) -> bool:
        return self._tokenizer is not None

    def serves(self, mapping: MoleMapping) -> bool:
        """True when ``mapping``'s router is this one (same base, adapter and serving worker URL)."""
        wid = mapping.router.served_by
        return (
            wid == self.worker_id
            and mapping.worker(wid).url == self.url
            and mapping.base_model == self.base_model
            and mapping.router.adapter == self.adapter
        )

    def config_for(self, spec: RouterSpec) -> RouterConfig:
        """Labels and their token ids as the local router has them; ``text`` is the question."""
        from shared.scoring import label_sequences

        labels = tuple(spec.ordered_labels())
        ids = tuple(tuple(seq) for seq in label_sequences(self._tokenizer, labels))
        return RouterConfig(labels=labels, label_ids=ids, text=spec.prompt, max_pixels=spec.max_pixels)

    # ---- scoring ---------------------------------------------------------------------------
    async def score_b64(self, image_b64: str, config: RouterConfig, *, deadline: float) -> RouteScores:
        """Probabilities of ``config``'s labels for the image (its base64, as received)."""
        user = [
            {"type": "image_url", "image_url": {"url": data_url(image_b64)}},
            {"type": "text", "text": config.text},
        ]
        body: dict[str, Any] = {"model": ROUTER_MODEL_NAME, "messages": [{"role": "user", "content": user}]}
        size = _image_size(self.base_model, config.max_pixels)
        if size is not None:
            body["mm_processor_kwargs"] = {"size": size}
        # every label's every token, asked after the label's tokens before it: one request per
        # distinct prefix (the empty one: every label's first token)
        asks: dict[tuple[int, ...], set[int]] = {}
        for ids in config.label_ids:
            for k, token in enumerate(ids):
                asks.setdefault(tuple(ids[:k]), set()).add(token)
        prefixes = list(asks)
        found = await asyncio.gather(*(self._ask(body, p, asks[p], deadline) for p in prefixes))
        after = dict(zip(prefixes, found, strict=True))
        scores = [sum(after[tuple(ids[:k])][t] for k, t in enumerate(ids)) for ids in config.label_ids]
        top = max(scores)
        weights = [math.exp(s - top) for s in scores]
        norm = sum(weights)
        return RouteScores(labels=config.labels, probabilities=tuple(w / norm for w in weights))

    async def _ask(
        self, body: dict[str, Any], prefix: tuple[int, ...], tokens: set[int], deadline: float
    ) -> dict[int, float]:
        """Log-probabilities of ``tokens`` after the label tokens ``prefix``."""
        left = deadline - time.monotonic()
        if left <= 0:
            raise self._unavailable("no time left before the request's deadline")
        text = self._tokenizer.decode(list(prefix)) if prefix else None
        try:
            found, prompt_ids = await next_token_logprobs(
                self._client, self.url, body, text, sorted(tokens), headers=self._headers, timeout_s=left
            )
        except LogprobsFailed as exc:
            raise self._unavailable(str(exc)) from None
        if prefix and tuple(prompt_ids[-len(prefix) :]) != prefix:
            raise self._unavailable(
                f"its chat template tokenizes the label start {text!r} as {prompt_ids[-len(prefix) :]}, "
                f"not {list(prefix)}"
            )
        return found

    def _unavailable(self, why: str) -> RouterUnavailable:
        message = (
            f"the router could not run on worker {self.worker_id}: {why}; name an expert to skip routing"
        )
        logger.warning("%s", message, extra={"worker_id": self.worker_id})
        return RouterUnavailable(message, worker_id=self.worker_id)
