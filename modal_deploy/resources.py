"""The Modal objects every app of a spec shares, whatever serves it: its volumes and its secret."""

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
