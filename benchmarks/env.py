"""The context every scenario runs in: options, demo assets, inputs, in-process workers, and the
expensive shared pieces (the process stack, the original-design baseline) built once, on first use.

In-process workers are the real :class:`worker.service.WorkerService` (input checks, image decoding,
prompt rendering, the micro-batcher, the model holder); only the HTTP layer is left out. Scenarios
about the whole system use real processes (:class:`mole.supervisor.Stack`).
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from benchmarks.core import Call, Run, side_by_side
from mole import synthetic
from shared.images import encode_image_b64
from shared.mapping import MoleMapping, current_keys, load_mapping, parse_mapping
from shared.schemas import InferRequest
from shared.settings import Settings

if TYPE_CHECKING:
    from PIL.Image import Image

    from benchmarks.baseline import OriginalServer
    from mole.supervisor import Stack
    from worker.service import WorkerService

MAX_NEW_TOKENS = 16  # every request's generation budget (the demo experts answer in 6-8 tokens)
READY_TIMEOUT_S = 180.0  # a loaded 2-core machine starting four torch processes at once is slow
STOP_GRACE_S = 30.0  # SIGTERM -> SIGKILL for the process stack
ALIAS_SOURCES = synthetic.KINDS  # aliases reuse the trained LoRAs' weights under new names


@dataclass(frozen=True)
class Options:
    """What ``mole-bench`` was asked for (see :func:`benchmarks.run.build_parser`)."""

    assets: Path  # demo assets folder (built if missing)
    work: Path  # scratch folder: stack mapping and logs, generated checkpoints
    out: Path  # the markdown file; plots go next to it
    device: str  # "cpu", "cuda", "cuda:1"
    dtype: str  # float32 on CPU, bfloat16 on CUDA unless overridden
    threads: int  # torch intra-op threads per process (CPU)
    quick: bool  # a few requests per measurement (smoke test), not for reading numbers

    @property
    def plots(self) -> Path:
        return self.out.parent


@dataclass(frozen=True)
class Input:
    """One benchmark request: a synthetic screen, its prompt, and the image as the wire carries it."""

    kind: str
    color: str
    prompt: str
    image: Image
    image_b64: str

    def expected(self, adapter: str) -> str:
        """What the expert answers for this screen (aliases answer like their source)."""
        source = next(k for k in synthetic.KINDS if adapter == k or adapter.startswith(f"{k}-"))
        return synthetic.expected_output(source, self.color)


def make_inputs(
    n: int, seed: int, kinds: tuple[str, ...] = synthetic.KINDS, size: tuple[int, int] | None = None
) -> list[Input]:
    """``n`` seeded synthetic screens (cycling through ``kinds``), optionally resized to ``size``."""
    out = []
    for s in synthetic.make_samples(n, seed=seed, kinds=kinds):
        image = s.image if size is None else s.image.resize(size)
        out.append(Input(s.kind, s.color, s.prompt, image, encode_image_b64(image)))
    return out


def alias_names(count: int) -> dict[str, str]:
    """``count`` alias adapter names -> the trained adapter whose weights they reuse."""
    names: dict[str, str] = {}
    for i in range(count):
        source = ALIAS_SOURCES[i % len(ALIAS_SOURCES)]
        names[f"{source}-{i // len(ALIAS_SOURCES) + 2}"] = source  # calendar-2, claim-2, ..., calendar-3
    return names


def infer_request(inp: Input, adapter: str, max_new_tokens: int = MAX_NEW_TOKENS) -> InferRequest:
    return InferRequest(
        image_b64=inp.image_b64, prompt=inp.prompt, adapter=adapter, max_new_tokens=max_new_tokens
    )


def service_calls(services: dict[str, Any], inputs: list[Input], adapter: str) -> dict[str, Call]:
    """One closed-loop call per in-process ``WorkerService``: request ``i`` sends input ``i`` (cycled)
    for ``adapter`` and returns the tokens generated."""

    def caller(service: Any) -> Call:
        async def call(i: int) -> int:
            resp = await service.infer(infer_request(inputs[i % len(inputs)], adapter))
            return int(resp.tokens_generated)

        return call

    return {name: caller(service) for name, service in services.items()}


@dataclass
class BenchContext:
    """Shared state of one ``mole-bench`` run."""

    options: Options
    mapping: MoleMapping = field(init=False)
    _stack: Stack | None = field(default=None, init=False)
    _original: OriginalServer | None = field(default=None, init=False)
    _port: int = field(default=20000, init=False)

    def __post_init__(self) -> None:
        self.mapping = load_mapping(self.options.assets / "expert_machine_mapping.json", check_paths=True)

    @property
    def quick(self) -> bool:
        return self.options.quick

    def pick(self, full: Any, quick: Any) -> Any:
        """``quick`` in ``--quick`` runs, ``full`` otherwise."""
        return quick if self.options.quick else full

    async def throughput_sweep(
        self, calls: dict[str, Call], levels: tuple[int, ...]
    ) -> dict[int, dict[str, Run]]:
        """Closed-loop throughput of every system in ``calls`` at each concurrency, side by side
        (``(1, 4)`` only in ``--quick`` runs)."""
        out: dict[int, dict[str, Run]] = {}
        for c in self.pick(levels, (1, 4)):
            out[c] = await side_by_side(calls, self.pick(max(48, 6 * c), 8), c, rounds=self.pick(3, 1))
        return out

    def lora_rank(self) -> int:
        """Rank of the expert LoRAs."""
        cfg = json.loads((Path(self.mapping.adapters["calendar"].lora) / "adapter_config.json").read_text())
        return int(cfg["r"])

    def text_width(self) -> int:
        """Hidden size of the base model's language model."""
        cfg = json.loads((Path(self.mapping.base_model) / "config.json").read_text())
        return int(cfg["text_config"]["hidden_size"])

    # ---- mappings --------------------------------------------------------------------------
    def bench_mapping(self, workers: list[dict[str, Any]], aliases: int = 0) -> MoleMapping:
        """The demo mapping plus ``aliases`` alias adapters and extra in-process ``workers``
        (``{"id", "mode", "adapters", "model"?}``; URLs are placeholders, nothing listens there)."""
        doc = current_keys(json.loads((self.options.assets / "expert_machine_mapping.json").read_text()))
        for alias, source in alias_names(aliases).items():
            doc["adapters"][alias] = {
                **doc["adapters"][source],
                "label": None,
                "hot": False,
                "merged": None,
            }
        for w in workers:
            self._port += 1
            doc["workers"].append({"url": f"http://127.0.0.1:{self._port}", **w})
        if aliases:  # every adapter must be held by some worker
            doc["workers"].append(
                {
                    "id": "bench-aliases",
                    "url": f"http://127.0.0.1:{self._port + 1000}",
                    "mode": "dynamic",
                    "adapters": list(alias_names(aliases)),
                }
            )
        return parse_mapping(doc, base_dir=self.options.assets, source="bench mapping")

    def alias_paths(self, count: int) -> dict[str, str]:
        """Alias adapter name -> LoRA folder (its source's)."""
        return {alias: self.mapping.adapters[src].lora for alias, src in alias_names(count).items()}

    # ---- in-process workers ----------------------------------------------------------------
    def settings(self, **overrides: Any) -> Settings:
        """Worker settings for in-process services: defaults plus ``overrides`` (batching etc.)."""
        return Settings(device=self.options.device, dtype=self.options.dtype, **overrides)

    async def start_worker(self, mapping: MoleMapping, worker_id: str, **overrides: Any) -> WorkerService:
        """A loaded and warmed :class:`WorkerService` for ``worker_id`` (its batcher running)."""
        from worker.service import WorkerService

        service = WorkerService(
            self.settings(**overrides),
            mapping,
            worker_id,
            device=self.options.device,
            dtype=self.options.dtype,
        )
        thread = service.start_loading()
        await asyncio.to_thread(thread.join)
        if service.state != "ready":
            raise RuntimeError(f"worker {worker_id} failed to load: {service.load_error}")
        return service

    # ---- shared expensive pieces -----------------------------------------------------------
    async def original(self) -> OriginalServer:
        """The original single-server design (router + 4 experts + 4 aliases in one PeftModel)."""
        if self._original is None:
            from benchmarks.baseline import OriginalServer

            server = OriginalServer(
                self.mapping,
                device=self.options.device,
                dtype=self.options.dtype,
                extra_adapters=self.alias_paths(4),
            )
            await asyncio.to_thread(server.load)
            self._original = server
        return self._original

    async def stack(self) -> Stack:
        """The coordinator and the demo workers as real processes (started on first use)."""
        if self._stack is None:
            self._stack = await asyncio.to_thread(self._start_stack)
        return self._stack

    def _start_stack(self) -> Stack:
        """Every demo worker and the coordinator, started at once from a copy of the demo mapping on
        fresh loopback ports; returns when all are ready and the coordinator sees every worker up.
        Each process's spawn-to-ready time (``ready_after_s``) feeds the cost-growth scenario."""
        from mole.demo_assets import relocated_mapping
        from mole.supervisor import Stack

        root = self.options.work / "stack"
        env = {
            "MOLE_DEVICE": self.options.device,
            "MOLE_DTYPE": self.options.dtype,
            "MOLE_TORCH_THREADS": str(self.options.threads),
        }
        mapping = relocated_mapping(self.options.assets, root / "mapping.json")
        # Started on a worker thread of the event loop: no preexec_fn tie to that thread.
        stack = Stack(mapping, run_dir=root / "logs", env=env, stop_grace_s=STOP_GRACE_S, tie_to_parent=False)
        stack.start()
        try:
            stack.wait_ready(READY_TIMEOUT_S)
            wait_workers_up(stack.coordinator.probe_url, time.monotonic() + READY_TIMEOUT_S)
        except BaseException:
            stack.stop()
            raise
        return stack

    @property
    def stack_started(self) -> Stack | None:
        return self._stack

    def close(self) -> None:
        if self._stack is not None:
            self._stack.stop()
            self._stack = None
        self._original = None


def describe_model(ctx: BenchContext) -> dict[str, str]:
    """Size of the models the numbers were measured on (parameters, LoRA rank, image tokens)."""
    from benchmarks.core import param_count
    from shared.checkpoints import load_model, load_processor
    from shared.modeling import render_prompt

    m = ctx.mapping
    base = load_model(m.base_model)
    processor = load_processor(m.base_model)
    cfg = base.config
    lora_cfg = json.loads((Path(m.adapters["calendar"].lora) / "adapter_config.json").read_text())
    inp = make_inputs(1, seed=0)[0]
    text = render_prompt(processor, inp.prompt)
    tokens = processor(text=[text], images=[inp.image], return_tensors="pt")["input_ids"].shape[1]
    lora_bytes = sum(p.stat().st_size for p in Path(m.adapters["calendar"].lora).glob("*.safetensors"))
    image_processor = processor.image_processor
    return {
        "base": (
            f"tiny Qwen3-VL from `mole demo-assets`: {param_count(base) / 1e6:.2f} M parameters "
            f"(text: {cfg.text_config.num_hidden_layers} layers × {cfg.text_config.hidden_size} wide, "
            f"vision: {cfg.vision_config.depth} blocks × {cfg.vision_config.hidden_size} wide, "
            f"vocabulary {cfg.text_config.vocab_size})"
        ),
        "LoRAs": (
            f"router + {len(m.adapters)} experts, rank {lora_cfg['r']} on every attention and MLP projection "
            f"of the language model ({lora_bytes / 1024:.0f} KiB each); aliases in scenarios 3 and 6 reuse "
            "these weights under new names"
        ),
        "merged checkpoints": f"{', '.join(w.adapters[0] for w in m.workers if w.mode == 'merged')}",
        "prompt": (
            f"{tokens} tokens including the image's placeholder tokens "
            f"(image processor cap: {image_processor.size.longest_edge} pixels)"
        ),
    }


def wait_workers_up(coordinator_url: str, deadline: float) -> None:
    """Wait until the coordinator's prober has seen every worker up (``GET /workers``)."""
    import httpx

    while time.monotonic() < deadline:
        rows = httpx.get(f"{coordinator_url}/workers", timeout=2.0).json()
        rows = rows.get("workers", rows) if isinstance(rows, dict) else rows
        if all(r.get("state") == "up" for r in rows):
            return
        time.sleep(0.2)
    raise TimeoutError("the coordinator did not see every worker up")
