"""The router: base Qwen3-VL + router LoRA, loaded once; a route is ONE forward pass.

``Router.score`` queues the decoded image on a :class:`~shared.batching.MicroBatcher`, whose thread
scores every concurrent request at once (``score_labels``): one forward over the prompts, and when
some labels are several tokens long one more forward that continues the prompts' KV cache with
every label's tokens; then a softmax over the labels' sequence log-probabilities. Labels are any
strings the tokenizer encodes (``"10"``, ``"invoice-ocr"``), so a router may choose among dozens. :func:`decide` turns those scores, the mapping's thresholds,
fallback adapter and shadow flag, and an optional explicit expert into a :class:`RouteDecision`.

By default the router loads its own base model. In monolithic mode a :data:`RouterModelProvider`
lends it a :class:`SharedModel` instead: the one PEFT model that also holds the experts, with the
router LoRA under its own adapter name and the lock every user of that model holds.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from shared.batching import BatchSettings, MicroBatcher
from shared.errors import InvalidInput, NoConfidentRoute
from shared.mapping import MoleMapping, RouterSpec
from shared.schemas import RouteCandidate
from shared.settings import Settings, resolve_device_dtype

if TYPE_CHECKING:
    from PIL.Image import Image

    from coordinator.metrics import CoordinatorMetrics

logger = logging.getLogger(__name__)

TOP_K = 3  # candidates reported in responses and the X-Mole-Route-Top header
RoutedBy = Literal["router", "explicit", "fallback"]


@dataclass(frozen=True)
class RouterConfig:
    """What one mapping asks of the router model: its label tokens and the templated question."""

    labels: tuple[str, ...]  # labels, in the mapping's label order
    label_ids: tuple[tuple[int, ...], ...]  # each label's token ids (one or more), aligned with ``labels``
    text: str  # chat-templated router prompt
    max_pixels: int | None  # image budget of a routing forward (None: the checkpoint's)


@dataclass(frozen=True)
class SharedModel:
    """A loaded PEFT model the router borrows instead of loading its own (monolithic mode).

    ``model`` holds the router LoRA as ``adapter_name`` next to other adapters; the router runs every
    forward with ``adapter_names=[adapter_name] * n`` while holding ``lock``, which every other user
    of ``model`` holds too: PEFT installs per-call hooks for per-row adapters, so two forwards on
    one model must never overlap. ``release`` is called once by :meth:`Router.stop`, after the
    router's last forward (e.g. to unload the adapter when a reload replaced the router).
    """

    model: Any  # peft.PeftModel
    adapter_name: str
    lock: contextlib.AbstractContextManager[Any]  # a threading.Lock shared with the model's other users
    release: Callable[[], None] = lambda: None


# (base model folder, router adapter folder) -> the shared model holding that adapter. Blocking:
# called from Router.load() off the event loop; raises when it cannot lend a model for that pair.
RouterModelProvider = Callable[[str, str], SharedModel]


@dataclass(frozen=True)
class _RouteItem:
    image: Image
    config: RouterConfig


@dataclass(frozen=True)
class RouteScores:
    """Softmax over the label tokens of one image: ``probabilities[i]`` belongs to ``labels[i]``."""

    labels: tuple[str, ...]
    probabilities: tuple[float, ...]

    def ranked(self) -> list[tuple[str, float]]:
        """(label, probability), most probable first (ties keep label order)."""
        return sorted(zip(self.labels, self.probabilities, strict=True), key=lambda lp: -lp[1])


@dataclass(frozen=True)
class RouteDecision:
    """Which adapter serves a request and why."""

    adapter: str
    label: str  # the served adapter's label ("" when it has none)
    confidence: float | None  # router top probability; None when the expert was explicit
    routed_by: RoutedBy
    top_k: list[RouteCandidate] = field(default_factory=list)
    router_choice: str | None = None  # the router's top adapter whenever the router ran
    path: list[str] = field(default_factory=list)  # human-readable steps for routing_path


class Router:
    """Model holder for the router LoRA. ``load()`` is blocking; call it off the event loop."""

    def __init__(
        self,
        base_model: str,
        adapter: str,
        settings: Settings,
        metrics: CoordinatorMetrics,
        *,
        model_provider: RouterModelProvider | None = None,
    ):
        self.base_model = base_model
        self.adapter = adapter
        self._settings = settings
        self._metrics = metrics
        self._provider = model_provider  # None: load() loads a model of our own
        self.version = ""  # sha256 of the router adapter's weights, set by load()
        self.device = "cpu"
        self._model: Any = None
        self._processor: Any = None  # used only on the batcher thread
        self._tokenizer: Any = None  # a separate instance for the event loop's side (labels)
        self._adapter_name: str | None = None  # the router's adapter name in a shared model
        self._lock: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
        self._release: Callable[[], None] | None = None
        self._batcher: MicroBatcher[_RouteItem, tuple[float, ...]] = MicroBatcher(
            self._run_batch,
            BatchSettings(settings.max_batch_size, settings.max_wait_ms, settings.max_queue),
            key=lambda item: item.config,
            name="router",
            on_batch=self._observe_batch,
        )

    # ---- lifecycle -------------------------------------------------------------------------
    def load(self) -> None:
        """Load base + router LoRA (or borrow them from the model provider), hash the adapter and
        start the batcher thread."""
        import torch
        from peft import PeftModel
        from transformers import AutoTokenizer

        from shared.checkpoints import load_model, load_processor, weights_hash

        if self._settings.torch_threads:
            torch.set_num_threads(self._settings.torch_threads)
        device, dtype = resolve_device_dtype(self._settings)
        self.device = device
        # Our own processor even with a shared model: processors are cheap, weights are not, and
        # the model's other users tokenize on their own threads.
        self._processor = load_processor(self.base_model)
        # Fast tokenizers must not be used from two threads while one re-configures padding.
        self._tokenizer = AutoTokenizer.from_pretrained(self.base_model)
        if self._provider is not None:
            shared = self._provider(self.base_model, self.adapter)
            self._model = shared.model
            self._adapter_name = shared.adapter_name
            self._lock = shared.lock
            self._release = shared.release
        else:
            base = load_model(self.base_model, device=device, dtype=dtype)
            self._model = PeftModel.from_pretrained(base, self.adapter)
            self._model.eval()
        self.version = weights_hash(self.adapter)
        self._batcher.start()
        logger.info(
            "router loaded",
            extra={
                "router_version": self.version[:16],
                "device": device,
                "shared_model": self._adapter_name is not None,
                "model_id": f"{id(self._model):#x}",
            },
        )

    def stop(self, timeout: float = 10.0) -> None:
        """Finish queued routes (bounded by ``timeout``), stop the thread, release a shared model."""
        self._batcher.stop(timeout)
        release, self._release = self._release, None
        if release is not None:
            release()

    @property
    def loaded(self) -> bool:
        return self._model is not None

    def serves(self, mapping: MoleMapping) -> bool:
        """True when ``mapping`` names this router's base model and adapter (no reload needed)."""
        return mapping.base_model == self.base_model and mapping.router.adapter == self.adapter

    # ---- configuration ---------------------------------------------------------------------
    def config_for(self, spec: RouterSpec) -> RouterConfig:
        """Label token ids and templated prompt for ``spec``; ``ValueError`` if a label has no
        tokens or two labels tokenize alike."""
        from shared.modeling import render_prompt
        from shared.scoring import label_sequences

        labels = tuple(spec.ordered_labels())
        ids = tuple(tuple(seq) for seq in label_sequences(self._tokenizer, labels))
        text = render_prompt(self._processor, spec.prompt)
        return RouterConfig(labels=labels, label_ids=ids, text=text, max_pixels=spec.max_pixels)

    # ---- scoring ---------------------------------------------------------------------------
    async def score(
        self, image: Image, config: RouterConfig, *, deadline: float | None = None
    ) -> RouteScores:
        """Probabilities of ``config``'s labels for ``image`` (batched with concurrent callers)."""
        probs = await self._batcher.submit(_RouteItem(image, config), deadline=deadline)
        return RouteScores(labels=config.labels, probabilities=probs)

    def _run_batch(self, items: Sequence[_RouteItem]) -> list[tuple[float, ...]]:
        import torch

        from shared.scoring import score_labels

        config = items[0].config  # the batcher groups by config, so every item shares it
        names = [self._adapter_name] * len(items) if self._adapter_name is not None else None
        with self._lock:
            scores = score_labels(
                self._model,
                self._processor,
                [i.image for i in items],
                [config.text] * len(items),
                config.label_ids,
                adapter_names=names,
                max_pixels=config.max_pixels,
            )
        probs = torch.softmax(scores, dim=-1)  # over the labels' full sequences
        return [tuple(float(p) for p in row) for row in probs.tolist()]

    def _observe_batch(self, size: int, seconds: float) -> None:
        self._metrics.router_batch_size.observe(size)
        self._metrics.router_batch_seconds.observe(seconds)


def _candidates(mapping: MoleMapping, scores: RouteScores) -> list[RouteCandidate]:
    return [
        RouteCandidate(label=label, adapter=mapping.router.labels[label], probability=round(p, 6))
        for label, p in scores.ranked()[:TOP_K]
    ]


def _label_of(mapping: MoleMapping, adapter: str) -> str:
    """The adapter's router label ("" for an unlabelled, discovered or base-model name)."""
    spec = mapping.adapters.get(adapter)
    return (spec.label or "") if spec is not None else ""


def text_only_decision(mapping: MoleMapping, explicit: str | None) -> RouteDecision:
    """The adapter for a request without an image: the router reads screenshots, so the explicit
    expert serves, else the router's fallback adapter; with neither it is ``InvalidInput``."""
    if explicit is not None:
        return RouteDecision(
            explicit, _label_of(mapping, explicit), None, "explicit", path=[f"explicit:{explicit}"]
        )
    fallback = mapping.router.fallback_adapter
    if fallback is None:
        raise InvalidInput(
            "image_b64: a request without an image needs an explicit expert (model); the router "
            "routes by the screenshot and this mapping has no router.fallback_adapter",
            field="image_b64",
        )
    return RouteDecision(
        fallback, _label_of(mapping, fallback), None, "fallback", path=[f"text_only->fallback:{fallback}"]
    )


def decide(mapping: MoleMapping, scores: RouteScores | None, explicit: str | None) -> RouteDecision:
    """Choose the adapter for a request.

    - ``explicit`` (already resolved to an adapter name) wins; the router's scores, when present
      (shadow mode), are only recorded.
    - Shadow mode without an explicit expert serves the fallback adapter when one is configured.
    - Otherwise the router's top label serves, unless its probability is below the label's threshold:
      then the fallback adapter serves (``routed_by="fallback"``) or ``NoConfidentRoute`` (422).
    """
    spec = mapping.router
    top_k = _candidates(mapping, scores) if scores is not None else []
    choice = top_k[0].adapter if top_k else None
    path = [f"router:{top_k[0].label}->{choice}@{top_k[0].probability:.3f}"] if top_k else []
    if explicit is not None:
        label = _label_of(mapping, explicit)
        return RouteDecision(
            explicit, label, None, "explicit", top_k, choice, [*path, f"explicit:{explicit}"]
        )
    assert scores is not None and top_k, "the router must run when no expert is explicit"
    top = top_k[0]
    fallback = spec.fallback_adapter
    if spec.shadow and fallback is not None:
        label = mapping.adapters[fallback].label or ""
        return RouteDecision(fallback, label, top.probability, "fallback", top_k, choice, [*path, "shadow"])
    threshold = spec.threshold(top.label)
    if top.probability >= threshold:
        return RouteDecision(top.adapter, top.label, top.probability, "router", top_k, choice, path)
    if fallback is None:
        raise NoConfidentRoute(
            f"router confidence {top.probability:.3f} for label {top.label} ({top.adapter}) is below "
            f"its threshold {threshold:.3f} and no fallback adapter is configured; name an expert",
            label=top.label,
            adapter=top.adapter,
            confidence=top.probability,
            threshold=threshold,
            top_k=[c.model_dump() for c in top_k],
        )
    label = mapping.adapters[fallback].label or ""
    step = f"below_threshold:{threshold:.3f}->fallback:{fallback}"
    return RouteDecision(fallback, label, top.probability, "fallback", top_k, choice, [*path, step])
