"""``mole modal-deploy``: deploy every worker of a mapping to Modal, then the coordinator.

Each app is one ``modal deploy -m modal_deploy.app --name APP`` with its spec in ``MOLE_MODAL_SPEC``
(``-m modal_deploy.vllm_app`` for a worker on vLLM).
The workers go first; the URLs Modal gives them become the coordinator's ``MOLE_WORKER_*_URL``
variables (and are printed, for a mapping used elsewhere). ``--dry-run`` prints the plan only and
needs neither the ``modal`` package nor a Modal token.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import subprocess
import sys

from modal_deploy.spec import SPEC_ENV, AppSpec, build_specs, load_for_modal, worker_url_vars
from shared.errors import ConfigError
from shared.table import format_table

_URL = re.compile(r"https://[A-Za-z0-9.-]+\.modal\.run")


def plan_table(specs: list[AppSpec], workspace: str | None) -> str:
    """Aligned table: app, engine, GPU, cpu/memory, region, containers min-max, scale-down, concurrency per
    container, the capacity the coordinator sends the app at once (max containers x concurrency),
    auth, URL."""
    rows: list[tuple[str, ...]] = []
    for s in specs:
        auth = "proxy+" if s.requires_proxy_auth else ""
        auth += "api-key" if s.role == "coordinator" else "worker-token"
        rows.append(
            (
                s.name,
                s.engine if s.role == "worker" else "-",
                s.gpu or "none",
                f"{s.cpu:g} / {s.memory_mib // 1024} GiB",
                s.region or "any",
                f"{s.min_containers}-{s.max_containers}",
                f"{s.scaledown_window_s}s",
                str(s.max_concurrency),
                str(s.max_containers * s.max_concurrency),
                auth,
                s.url(workspace or "<workspace>"),
            )
        )
    return format_table(
        (
            "APP",
            "ENGINE",
            "GPU",
            "CPU / MEM",
            "REGION",
            "CONTAINERS",
            "SCALEDOWN",
            "CONCURRENCY",
            "CAPACITY",
            "AUTH",
            "URL",
        ),
        rows,
    )


def deploy_one(spec: AppSpec) -> str | None:
    """Run ``modal deploy`` for ``spec`` (its output streamed to stdout); return the endpoint URL
    it printed, or None. Raises ``RuntimeError`` when the deploy fails."""
    env = {**os.environ, SPEC_ENV: spec.model_dump_json(), "COLUMNS": "300"}  # COLUMNS: no wrapped URLs
    cmd = [sys.executable, "-m", "modal", "deploy", "-m", spec.module, "--name", spec.name]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    url = None
    for line in proc.stdout:
        sys.stdout.write(line)
        found = _URL.search(line)
        url = found.group(0) if found else url
    if proc.wait() != 0:
        raise RuntimeError(f"modal deploy of {spec.name} failed with exit code {proc.returncode}")
    return url


def run(args: argparse.Namespace) -> int:
    """The command. Exit codes: 0 done, 1 a deploy failed, 2 bad mapping or ``modal`` missing."""
    try:
        mapping = load_for_modal(args.config)
        specs = build_specs(
            mapping,
            workspace=args.workspace,
            coordinator=not args.skip_coordinator,
            coordinator_proxy_auth=not args.public_coordinator,
            region=args.region,
        )
        url_vars = worker_url_vars(mapping)
    except ConfigError as exc:
        print(f"mole modal-deploy: {args.config}: {exc}", file=sys.stderr)
        return 2
    workers = [s for s in specs if s.role == "worker"]
    print(plan_table(specs, args.workspace))
    if args.dry_run:
        print("\n# dry run: nothing deployed. The coordinator reaches the workers through:")
        for s in workers:
            assert s.worker_id is not None
            print(f"{url_vars[s.worker_id]}={s.url(args.workspace or '<workspace>')}")
        return 0
    if importlib.util.find_spec("modal") is None:
        print(
            "mole modal-deploy: the modal package is missing: pip install modal && modal setup",
            file=sys.stderr,
        )
        return 2
    urls: dict[str, str] = {}
    try:
        for s in workers:
            assert s.worker_id is not None
            print(f"\n== deploying {s.name} ({s.gpu or 'no GPU'})", flush=True)
            url = deploy_one(s) or (s.url(args.workspace) if args.workspace else None)
            if url is None:
                raise RuntimeError(
                    f"no endpoint URL in the output of modal deploy for {s.name}; pass --workspace"
                )
            urls[s.worker_id] = url
        print("\n# worker endpoints: put these in the environment of a coordinator using this mapping")
        for worker_id, url in urls.items():
            print(f"{url_vars[worker_id]}={url}")
        if not args.skip_coordinator:
            coordinator = build_specs(
                mapping,
                worker_urls=urls,
                coordinator_proxy_auth=not args.public_coordinator,
                region=args.region,
            )[-1]
            print(f"\n== deploying {coordinator.name}", flush=True)
            url = deploy_one(coordinator)
            print(f"\ncoordinator: {url or coordinator.url(args.workspace or '<workspace>')}")
    except RuntimeError as exc:
        print(f"mole modal-deploy: {exc}", file=sys.stderr)
        return 1
    return 0
