"""``mole demo``: the main job end to end on the embedded default.

Builds (or reuses) the demo assets, starts the local stack with :class:`mole.supervisor.Stack`, sends
held-out screenshots of every expert through ``POST /classify`` (router-chosen, plus one explicit
expert and one ``prefer_merged=false`` request), prints a table, stops the stack. Exits non-zero
when a service fails, a request fails, a screen is routed to the wrong expert, or an answer is not
in its expert's format.

``mole demo --engine vllm`` (``make demo-vllm``) runs the same demo with every worker and the router
on vLLM: the demo mapping with ``"engine": "vllm"`` on each worker and ``router.served_by`` the
dynamic worker, written next to it as ``expert_machine_mapping.vllm.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from mole import synthetic
from shared import table
from shared.images import encode_image_b64

SAMPLES_PER_KIND = 2  # held-out screens per screen kind (one kind per adapter)


@dataclass
class Case:
    expected: str  # the adapter that should answer (by name)
    sample: synthetic.Sample
    expert: str | int | None = None  # the request's explicit "expert" (adapter name or label)
    prefer_merged: bool | None = None
    note: str = "routed"


@dataclass
class Outcome:
    case: Case
    status: int
    body: dict
    latency_ms: float

    @property
    def ok(self) -> bool:
        if self.status != 200:
            return False
        return self.body["adapter"] == self.case.expected and bool(
            synthetic.EXPERT_FORMATS[self.case.expected].match(self.body["output"])
        )

    @property
    def exact(self) -> bool:
        return self.status == 200 and self.body["output"] == synthetic.expected_output(
            self.case.expected, self.case.sample.color
        )


def build_cases(seed: int = 2026) -> list[Case]:
    samples = synthetic.make_samples(len(synthetic.KINDS) * SAMPLES_PER_KIND, seed=seed)
    cases = [Case(s.kind, s) for s in samples]
    login = next(s for s in samples if s.kind == "login")
    calendar = next(s for s in samples if s.kind == "calendar")
    cases.append(Case("login", login, expert="login", note="explicit"))
    cases.append(Case("calendar", calendar, prefer_merged=False, note="prefer_merged=false"))
    return cases


def send(client: httpx.Client, url: str, case: Case) -> Outcome:
    body: dict = {"image_b64": encode_image_b64(case.sample.image), "prompt": case.sample.prompt}
    if case.expert is not None:
        body["expert"] = case.expert
    if case.prefer_merged is not None:
        body["prefer_merged"] = case.prefer_merged
    t0 = time.perf_counter()
    try:
        r = client.post(f"{url}/classify", json=body)
        status, payload = r.status_code, r.json()
    except (httpx.HTTPError, ValueError) as exc:
        status, payload = 0, {"error": {"message": str(exc)}}
    return Outcome(case, status, payload, (time.perf_counter() - t0) * 1000)


def format_table(outcomes: list[Outcome]) -> str:
    rows = []
    for o in outcomes:
        b = o.body
        if o.status == 200:
            conf = "explicit" if b.get("confidence") is None else f"{b['confidence']:.2f}"
            routed, worker, mode, output = b["adapter"], b["worker_id"], b["mode"], b["output"]
        else:
            conf, routed, worker, mode = "-", f"HTTP {o.status}", "-", "-"
            output = str(b.get("error", {}).get("message", ""))[:60]
        mark = "ok" if o.ok else "FAIL"
        rows.append(
            (mark, o.case.note, o.case.expected, routed, conf, worker, mode, output, f"{o.latency_ms:.0f}")
        )
    header = ("", "request", "expected", "routed to", "conf", "worker", "mode", "output", "ms")
    return table.format_table(header, rows, rule=True)


VLLM_MAX_MODEL_LEN = 512  # the demo's prompts are ~60 tokens; a small KV cache per sequence on CPU


def vllm_mapping(assets: Path) -> Path:
    """The demo mapping with every worker on vLLM and the router served by the dynamic worker."""
    doc = json.loads((assets / "expert_machine_mapping.json").read_text())
    for worker in doc["workers"]:
        worker["engine"] = "vllm"
        worker["max_model_len"] = VLLM_MAX_MODEL_LEN
    doc["router"]["served_by"] = next(w["id"] for w in doc["workers"] if w["mode"] == "dynamic")
    path = assets / "expert_machine_mapping.vllm.json"
    path.write_text(json.dumps(doc, indent=2))
    return path


def run(args: argparse.Namespace) -> int:
    from mole.demo_assets import build_demo_assets
    from mole.supervisor import Stack, StackError
    from mole.up import Progress

    assets = Path(args.assets)
    build_demo_assets(assets, log=lambda msg: print(msg, file=sys.stderr))
    engine = getattr(args, "engine", "hf")
    mapping = vllm_mapping(assets) if engine == "vllm" else assets / "expert_machine_mapping.json"
    print(f"starting the local stack from {mapping}", file=sys.stderr)
    try:
        with Stack(mapping, env={"MOLE_TORCH_THREADS": "1"}) as stack:  # started on entry
            stack.wait_ready(progress=Progress())
            print(stack.table(), file=sys.stderr)
            url = stack.coordinator.probe_url
            with httpx.Client(timeout=60) as client:
                outcomes = [send(client, url, case) for case in build_cases()]
    except StackError as exc:
        print(f"mole demo: the stack failed: {exc}", file=sys.stderr)
        return 1
    print(format_table(outcomes))
    failed = [o for o in outcomes if not o.ok]
    exact = sum(o.exact for o in outcomes)
    where = "every worker and the router on vLLM" if engine == "vllm" else "mole's HF workers"
    print(
        f"\n{len(outcomes) - len(failed)}/{len(outcomes)} requests routed to the right expert with a "
        f"well-formed answer; {exact}/{len(outcomes)} answers read the screen exactly ({where})."
    )
    if failed:
        print(f"mole demo: {len(failed)} request(s) failed", file=sys.stderr)
        return 1
    return 0
