"""The Modal app of a worker whose mapping entry says ``"engine": "vllm"``: vLLM's OpenAI server
behind ``@modal.web_server``, the shape of Modal's own vLLM example.

``mole modal-deploy`` runs ``modal deploy -m modal_deploy.vllm_app`` for such a worker, with its spec
in ``MOLE_MODAL_SPEC`` (baked into the image too, so the container rebuilds the same app). The app
has the name, URL, GPU, volumes, secret and scaling an HF worker's app would have, so the
coordinator reaches it the same way. Reads top to bottom: spec, image, app, the function.
"""

from __future__ import annotations

import subprocess

import modal

from modal_deploy.resources import container_options, volumes
from modal_deploy.serving import vllm_command
from modal_deploy.spec import (
    MAPPING_IN_IMAGE,
    SPEC_ENV,
    VLLM_PORT,
    VLLM_PYTHON_VERSION,
    spec_from_env,
    vllm_image_packages,
)

PACKAGES = ("mole", "shared", "modal_deploy")  # mole.vllm_serve computes the server's arguments

SPEC = spec_from_env()  # which worker this app is, with its GPU, volumes, secret and scaling

# vLLM from PyPI (its CUDA build) and nothing else: vLLM pins its own torch and transformers, and
# mole.vllm_serve needs only vLLM's dependencies. The code and the mapping go on top. No weights.
image = (
    modal.Image.debian_slim(python_version=VLLM_PYTHON_VERSION)
    .pip_install(*vllm_image_packages())
    .env({**SPEC.env, SPEC_ENV: SPEC.model_dump_json(), "VLLM_NO_USAGE_STATS": "1"})
    .add_local_file(SPEC.mapping_path, MAPPING_IN_IMAGE, copy=False)
    .add_local_python_source(*PACKAGES)
)

app = modal.App(SPEC.name)


@app.function(image=image, **container_options(SPEC, volumes(SPEC)))
@modal.concurrent(max_inputs=SPEC.max_concurrency)
@modal.web_server(
    port=VLLM_PORT,
    startup_timeout=SPEC.startup_timeout_s,
    label=SPEC.name,
    requires_proxy_auth=SPEC.requires_proxy_auth,
)
def serve() -> None:
    """Start the server and return; Modal sends traffic once its port accepts connections. The
    worker token comes from the secret (``MOLE_WORKER_TOKEN``) and becomes vLLM's API key."""
    subprocess.Popen(vllm_command(SPEC))
