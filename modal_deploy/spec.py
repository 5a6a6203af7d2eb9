"""The Modal deployment of a mapping as plain data: one :class:`AppSpec` per worker, one for the
coordinator.

Nothing here imports ``modal``: :func:`build_specs` is pure and tested, ``modal_deploy/app.py``
turns one spec into a Modal app (``modal_deploy/vllm_app.py`` for a worker on vLLM), and ``mole modal-deploy`` (``modal_deploy/deploy.py``) runs
``modal deploy`` once per spec. Modal accepts any GPU string and scaling value at definition time
and fails only at deploy, so the checks live here and name the mapping entry.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from mole.vllm_serve import VLLM_VERSION
from shared.errors import ConfigError
from shared.mapping import Engine, MoleMapping

APP_PREFIX = "mole"  # app names and endpoint labels: mole-<worker id>, mole-coordinator
DEFAULT_GPU = "H100"  # a worker without "gpu" in the mapping
COORDINATOR_GPU = "H100"  # the router runs one forward of the base model per request
SECRET_NAME = (
    "mole-secrets"  # modal secret create mole-secrets HF_TOKEN=... MOLE_WORKER_TOKEN=... MOLE_API_KEYS=...
)
WORKER_SECRET_KEYS = ("MOLE_WORKER_TOKEN",)  # a worker on a public URL never runs without its token
COORDINATOR_SECRET_KEYS = ("MOLE_WORKER_TOKEN", "MOLE_API_KEYS")  # MOLE_ENV=production needs API keys
MODELS_MOUNT = "/models"  # base checkpoints (MOLE_MODEL_ROOT in the mapping)
VOLUME_MOUNT = "/vol"  # loras/ and merged/ (MOLE_VOLUME in the mapping)
HF_CACHE_MOUNT = "/cache/huggingface"  # HF_HOME: processor/tokenizer files fetched by name, if any
VOLUMES = {  # mount path -> modal.Volume name; weights are never baked into the image
    MODELS_MOUNT: "mole-models",
    VOLUME_MOUNT: "mole-vol",
    HF_CACHE_MOUNT: "mole-hf-cache",
}
WEIGHT_MOUNTS = (MODELS_MOUNT, VOLUME_MOUNT)  # what a worker may load weights from
MAPPING_IN_IMAGE = "/opt/mole/expert_machine_mapping.json"  # where the image carries the mapping
SPEC_ENV = "MOLE_MODAL_SPEC"  # the JSON AppSpec that modal_deploy/app.py builds its app from
CONTAINER_ENV = {  # baked into every image; the mapping's ${...} expand against these in the container
    "MOLE_MODEL_ROOT": MODELS_MOUNT,
    "MOLE_VOLUME": VOLUME_MOUNT,
    "HF_HOME": HF_CACHE_MOUNT,
    "MOLE_LOG_JSON": "true",
}
COORDINATOR_SCALING = {
    "min_containers": 1,
    "max_containers": 2,
    "scaledown_window_s": 300,
    "max_concurrency": 64,
}
# Resources every container reserves unless the mapping's worker says otherwise. Modal's default is
# a fraction of a core, too little for tokenising, image preprocessing and the event loop next to
# an H100; the memory covers an 8B bf16 checkpoint's mapped files while it loads (~17.5 GB) and the
# process around it.
DEFAULT_CPU = 8.0  # cores
DEFAULT_MEMORY_MIB = 65_536  # 64 GiB
# Beside pyproject's dependencies: torchvision, so Qwen3-VL gets its fast (torchvision) image
# processor instead of the PIL fallback; pip picks the release built for the pinned torch.
IMAGE_EXTRAS = ("torchvision",)
# A vLLM worker's image: PyPI's vllm (the CUDA build; Modal provides the driver) on Modal's python
# image, as Modal's own vLLM example builds it. Nothing of mole's pyproject: vLLM pins its own torch
# and transformers, and the container runs only mole.vllm_serve, which needs vLLM's dependencies alone.
VLLM_PYTHON_VERSION = "3.12"
VLLM_PORT = 8000  # where vLLM listens in its container; @modal.web_server proxies it
MODAL_MODULES: dict[Engine, str] = {  # the file `modal deploy -m` loads for a worker's engine
    "hf": "modal_deploy.app",  # mole's worker (and the coordinator) behind @modal.asgi_app
    "vllm": "modal_deploy.vllm_app",  # vLLM's OpenAI server behind @modal.web_server
}
STARTUP_TIMEOUT_S = 1200  # @modal.enter may load an 8B checkpoint from a cold volume
SCALEDOWN_RANGE_S = (2, 3600)  # what Modal accepts for scaledown_window

_GPU = re.compile(r"^(T4|L4|A10G?|A100(-40GB|-80GB)?|L40S|H100!?|H200|B200)(:[1-8])?$", re.IGNORECASE)
_URL_REF = re.compile(r"^\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-[^}]*)?\}$")


class AppSpec(BaseModel):
    """Everything one Modal app needs, as data. ``modal_deploy/app.py`` maps it 1:1 onto
    ``modal.App`` / ``@app.cls`` / ``@modal.concurrent`` / ``@modal.asgi_app``; for a vLLM worker
    ``modal_deploy/vllm_app.py`` onto ``@app.function`` / ``@modal.concurrent`` / ``@modal.web_server``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str  # Modal app name, also the web endpoint label
    role: Literal["worker", "coordinator"]
    worker_id: str | None  # None for the coordinator
    gpu: str | None  # Modal GPU type, e.g. "H100", "A100-80GB:2"; None: CPU only
    volumes: dict[str, str]  # mount path -> modal.Volume name
    secret: str  # modal.Secret name
    required_secret_keys: list[str]  # keys the secret must hold (checked by Modal at deploy)
    min_containers: int = Field(ge=0)  # warm containers
    max_containers: int = Field(ge=1)  # autoscaling ceiling
    scaledown_window_s: int = Field(
        ge=SCALEDOWN_RANGE_S[0], le=SCALEDOWN_RANGE_S[1]
    )  # idle before scale-down
    max_concurrency: int = Field(ge=1)  # @modal.concurrent(max_inputs=...)
    cpu: float = Field(gt=0)  # @app.cls(cpu=...): cores reserved per container
    memory_mib: int = Field(ge=1024)  # @app.cls(memory=...): MiB reserved per container
    region: str | None = None  # @app.cls(region=...): where containers run (None: anywhere)
    requires_proxy_auth: bool  # Modal-Key/Modal-Secret headers required at the endpoint
    timeout_s: int = Field(ge=1)  # longest request
    startup_timeout_s: int = Field(ge=1)  # longest @modal.enter
    env: dict[str, str]  # baked into the image
    mapping_path: str  # local mapping file copied to MAPPING_IN_IMAGE
    engine: Engine = "hf"  # what serves the app: mole's own app, or vLLM's server (a worker's "engine")

    @property
    def module(self) -> str:
        """The module ``modal deploy -m`` loads to build this app (see :data:`MODAL_MODULES`)."""
        return MODAL_MODULES[self.engine]

    def url(self, workspace: str, environment: str | None = None) -> str:
        """The endpoint URL Modal gives this app's label in ``workspace`` (non-main environments
        add ``-<environment>`` after the workspace)."""
        host = workspace if environment in (None, "", "main") else f"{workspace}-{environment}"
        return f"https://{host}--{self.name}.modal.run"


def worker_url_vars(mapping: MoleMapping) -> dict[str, str]:
    """Worker id -> the environment variable its ``url`` is read from (``"${VAR:-default}"`` in the
    mapping file), which is how the coordinator learns each worker's Modal URL.

    Raises ``ConfigError`` naming every worker whose URL is not a single ``${VAR...}`` reference.
    """
    if mapping.source_path is None:
        raise ConfigError("mapping has no source file: load it with load_mapping(path)")
    raw = json.loads(mapping.source_path.read_text(encoding="utf-8"))
    found: dict[str, str] = {}
    problems: list[str] = []
    for i, w in enumerate(raw.get("workers", [])):
        match = _URL_REF.match(str(w.get("url", "")))
        if match is None:
            problems.append(
                f'workers[{i}] "{w.get("id")}": url {w.get("url")!r} must be "${{VAR:-default}}" '
                "so the coordinator can be given the worker's Modal URL"
            )
        else:
            found[str(w["id"])] = match.group(1)
    if problems:
        raise ConfigError("cannot deploy the coordinator to Modal:\n  - " + "\n  - ".join(problems))
    return found


def build_specs(
    mapping: MoleMapping,
    *,
    worker_urls: Mapping[str, str] | None = None,
    workspace: str | None = None,
    coordinator: bool = True,
    coordinator_proxy_auth: bool = True,
    region: str | None = None,
) -> list[AppSpec]:
    """One spec per worker of ``mapping`` (mapping order), then the coordinator's. A worker's spec
    carries its ``engine``: a vLLM worker is the same app (name, URL, GPU, volumes, secret,
    scaling) running vLLM's server instead of mole's.

    ``mapping`` must be loaded with :data:`CONTAINER_ENV` (see :func:`load_for_modal`) so its paths
    are the container's. The coordinator's env points every worker URL variable at
    ``worker_urls[id]``, else at the URL Modal will give the worker in ``workspace``, else at a
    ``<workspace>`` placeholder. Workers require the worker token and no proxy auth (the
    coordinator authenticates with the token); the coordinator requires proxy auth unless
    ``coordinator_proxy_auth`` is false, and API keys always (``MOLE_ENV=production``). ``region``
    pins every app (a worker's own ``region`` wins); cpu and memory come from the worker, else
    :data:`DEFAULT_CPU` / :data:`DEFAULT_MEMORY_MIB`.

    Raises ``ConfigError`` naming the entry: an unknown GPU, a scale-down window Modal refuses, a
    weight path outside the volumes, an app name used twice.
    """
    if mapping.monolithic:
        raise ConfigError(
            "monolithic: true is not supported by mole modal-deploy (one Modal app per worker); "
            "deploy it as a distributed mapping, or run monolithic mode with mole coordinator on one GPU box"
        )
    source = str(mapping.source_path) if mapping.source_path is not None else ""
    timeout = int(mapping.dispatch.request_timeout_s) + 30
    specs: list[AppSpec] = []
    problems: list[str] = []
    for i, w in enumerate(mapping.workers):
        entry = f'workers[{i}] "{w.id}"'
        gpu = _check_gpu(w.gpu or DEFAULT_GPU, entry, problems)
        window = round(w.scaledown_window_s)
        if not SCALEDOWN_RANGE_S[0] <= window <= SCALEDOWN_RANGE_S[1]:
            problems.append(
                f"{entry}: scaledown_window_s must be within {SCALEDOWN_RANGE_S} on Modal, got {window}"
            )
        paths = [mapping.model_path(w.id), *mapping.adapters_on(w.id, discover=False).values()]
        paths += [w.discover] if w.discover else []
        _check_on_volumes(paths, entry, problems)
        if problems:
            continue
        specs.append(
            AppSpec(
                name=f"{APP_PREFIX}-{w.id}",
                role="worker",
                worker_id=w.id,
                gpu=gpu,
                volumes=dict(VOLUMES),
                secret=SECRET_NAME,
                required_secret_keys=list(WORKER_SECRET_KEYS),
                min_containers=w.min_containers,
                max_containers=w.max_containers,
                scaledown_window_s=window,
                max_concurrency=w.max_concurrency,
                cpu=w.cpu or DEFAULT_CPU,
                memory_mib=w.memory_mib or DEFAULT_MEMORY_MIB,
                region=w.region or region,
                requires_proxy_auth=False,
                timeout_s=timeout,
                startup_timeout_s=STARTUP_TIMEOUT_S,
                env=dict(CONTAINER_ENV),
                mapping_path=source,
                engine=w.engine,
            )
        )
    if coordinator and not problems:
        _check_on_volumes([mapping.base_model, mapping.router.adapter], "coordinator", problems)
        names = {s.name for s in specs}
        if f"{APP_PREFIX}-coordinator" in names:
            problems.append(f'a worker id "coordinator" collides with the app {APP_PREFIX}-coordinator')
        if not problems:
            specs.append(
                _coordinator_spec(
                    mapping, specs, worker_urls or {}, workspace, coordinator_proxy_auth, region
                )
            )
    if problems:
        raise ConfigError("cannot deploy to Modal:\n  - " + "\n  - ".join(problems), problems=problems)
    return specs


def _coordinator_spec(
    mapping: MoleMapping,
    workers: list[AppSpec],
    worker_urls: Mapping[str, str],
    workspace: str | None,
    proxy_auth: bool,
    region: str | None,
) -> AppSpec:
    url_vars = worker_url_vars(mapping)
    env = dict(CONTAINER_ENV)
    env["MOLE_ENV"] = "production"
    for spec in workers:
        assert spec.worker_id is not None
        url = worker_urls.get(spec.worker_id) or spec.url(workspace or "<workspace>")
        env[url_vars[spec.worker_id]] = url
    scaling = COORDINATOR_SCALING
    return AppSpec(
        name=f"{APP_PREFIX}-coordinator",
        role="coordinator",
        worker_id=None,
        # with the router on a vLLM worker (router.served_by) the coordinator loads no model
        gpu=None if mapping.router.served_by else COORDINATOR_GPU,
        volumes=dict(VOLUMES),
        secret=SECRET_NAME,
        required_secret_keys=list(COORDINATOR_SECRET_KEYS),
        min_containers=scaling["min_containers"],
        max_containers=scaling["max_containers"],
        scaledown_window_s=scaling["scaledown_window_s"],
        max_concurrency=scaling["max_concurrency"],
        cpu=DEFAULT_CPU,
        memory_mib=DEFAULT_MEMORY_MIB,
        region=region,
        requires_proxy_auth=proxy_auth,
        timeout_s=int(mapping.dispatch.request_timeout_s) + 30,
        startup_timeout_s=STARTUP_TIMEOUT_S,
        env=env,
        mapping_path=str(mapping.source_path or ""),
    )


def image_packages(pyproject: str | Path) -> list[str]:
    """What the image installs beside ``pyproject``'s dependencies: :data:`IMAGE_EXTRAS`, next to
    the pinned torch so pip resolves them against it (``ConfigError`` when torch is not pinned)."""
    import tomllib

    deps = tomllib.loads(Path(pyproject).read_text(encoding="utf-8"))["project"]["dependencies"]
    torch = [d.split(";")[0].strip() for d in deps if re.match(r"^torch\s*==", d)]
    if not torch:
        raise ConfigError(f"{pyproject}: torch is not pinned (torch==X.Y.Z), so torchvision cannot follow it")
    return [torch[0], *IMAGE_EXTRAS]


def vllm_image_packages() -> list[str]:
    """What a vLLM worker's image installs: vLLM at the version compose's image tag names too."""
    return [f"vllm=={VLLM_VERSION}"]


def load_for_modal(path: str, environ: Mapping[str, str] | None = None) -> MoleMapping:
    """Load a mapping as the Modal containers will see it: ``${VAR}`` expands against
    :data:`CONTAINER_ENV` over ``environ`` (default ``os.environ``), so paths are container paths."""
    from shared.mapping import load_mapping

    env = {**(os.environ if environ is None else environ), **CONTAINER_ENV}
    return load_mapping(path, env=env)


def spec_from_env(environ: Mapping[str, str] | None = None) -> AppSpec:
    """The spec ``mole modal-deploy`` put in ``MOLE_MODAL_SPEC`` (also baked into the image, so the
    container rebuilds the same app). Raises ``ConfigError`` when it is missing."""
    raw = (os.environ if environ is None else environ).get(SPEC_ENV)
    if not raw:
        raise ConfigError(
            f"{SPEC_ENV} is not set: deploy with `mole modal-deploy --config MAPPING`, "
            "which runs `modal deploy -m modal_deploy.app` once per app of the mapping"
        )
    return AppSpec.model_validate_json(raw)


def _check_gpu(gpu: str, entry: str, problems: list[str]) -> str:
    if not _GPU.match(gpu):
        problems.append(
            f"{entry}: gpu {gpu!r} is not a Modal GPU (T4, L4, A10G, A100-80GB, L40S, H100, H200, B200)"
        )
    return gpu.upper()


def _check_on_volumes(paths: list[str], entry: str, problems: list[str]) -> None:
    outside = [p for p in paths if not any(PurePosixPath(p).is_relative_to(m) for m in WEIGHT_MOUNTS)]
    if outside:
        problems.append(
            f"{entry}: not on a Modal volume ({', '.join(WEIGHT_MOUNTS)}): {', '.join(outside)}; "
            "use ${MOLE_MODEL_ROOT:-/models}/... or ${MOLE_VOLUME:-/vol}/... paths"
        )
