"""The Modal objects every app of a spec shares, whatever serves it: its volumes, its secret and the
rest of its container's options."""

from __future__ import annotations

from typing import Any

import modal

from modal_deploy.spec import AppSpec


def volumes(spec: AppSpec) -> dict[str | Any, Any]:
    """Mount path -> ``modal.Volume`` (weights, adapters, the Hugging Face cache), created when missing."""
    return {
        mount: modal.Volume.from_name(name, create_if_missing=True) for mount, name in spec.volumes.items()
    }


def secret(spec: AppSpec) -> modal.Secret:
    """The tokens; Modal refuses the deploy when the secret lacks one of ``required_secret_keys``."""
    return modal.Secret.from_name(spec.secret, required_keys=spec.required_secret_keys)


def container_options(spec: AppSpec, volumes: dict[str | Any, Any]) -> dict[str, Any]:
    """Keyword arguments of ``app.cls`` / ``app.function`` for the spec's containers, the same for
    mole's apps and vLLM's: GPU, volumes, secret, CPU and memory, region, scaling and timeout."""
    return {
        "gpu": spec.gpu,
        "volumes": volumes,
        "secrets": [secret(spec)],
        "cpu": spec.cpu,
        "memory": spec.memory_mib,
        "region": spec.region,
        "min_containers": spec.min_containers,
        "max_containers": spec.max_containers,
        "scaledown_window": spec.scaledown_window_s,
        "timeout": spec.timeout_s,
    }
