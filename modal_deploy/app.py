"""The Modal app of one mole service: a worker of the mapping, or the coordinator.

Deploy with ``mole modal-deploy --config MAPPING``: it builds one :class:`~modal_deploy.spec.AppSpec`
per service and runs ``modal deploy -m modal_deploy.app`` with the spec in ``MOLE_MODAL_SPEC``. The
spec is also baked into the image's environment, so the container re-imports this file and rebuilds
the same app. Reads top to bottom: spec, image, volumes and secret, app, the class.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import modal

from modal_deploy.resources import container_options, volumes
from modal_deploy.serving import ContainerApp, load, volume_refresher
from modal_deploy.spec import MAPPING_IN_IMAGE, SPEC_ENV, VOLUME_MOUNT, image_packages, spec_from_env

REPO = Path(__file__).resolve().parent.parent  # local checkout (deploy time only)
PACKAGES = ("mole", "shared", "worker", "coordinator", "modal_deploy")  # the project's code
PYTHON_VERSION = "3.11"  # as in pyproject's requires-python and the docker images

SPEC = spec_from_env()  # which service this app is, with its GPU, volumes, secret and scaling

# Dependencies come from pyproject.toml (torch from PyPI is a CUDA build), plus torchvision for
# Qwen3-VL's fast image processor; the code and the mapping are added on top, so a code change
# does not rebuild the dependency layers. No weights in the image.
image = (
    modal.Image.debian_slim(python_version=PYTHON_VERSION)
    .pip_install_from_pyproject(str(REPO / "pyproject.toml"))
    .pip_install(*image_packages(REPO / "pyproject.toml"))
    .env({**SPEC.env, SPEC_ENV: SPEC.model_dump_json()})
    .add_local_file(SPEC.mapping_path, MAPPING_IN_IMAGE, copy=False)
    .add_local_python_source(*PACKAGES)
)
VOLUMES = volumes(SPEC)

app = modal.App(SPEC.name)


@app.cls(image=image, startup_timeout=SPEC.startup_timeout_s, **container_options(SPEC, VOLUMES))
@modal.concurrent(max_inputs=SPEC.max_concurrency)
class Service:
    @modal.enter()
    def load(self) -> None:
        """Once per container: build the service; a worker loads its model before taking traffic."""
        # adapters put on the volume after this container started become visible on a reload
        self.container_app: ContainerApp = load(
            SPEC, refresh_storage=volume_refresher([VOLUMES[VOLUME_MOUNT]])
        )

    @modal.exit()
    def drain(self) -> None:
        self.container_app.close()

    @modal.asgi_app(label=SPEC.name, requires_proxy_auth=SPEC.requires_proxy_auth)
    def web(self) -> Any:
        return self.container_app
