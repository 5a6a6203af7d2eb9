"""A reload that changes how a worker is called gives it a new backend; one that does not keeps
the replica (its health and counters)."""

from __future__ import annotations

import copy
from typing import Any

import httpx

from coordinator.backends import HttpBackend
from coordinator.dispatch import Dispatcher
from coordinator.metrics import CoordinatorMetrics
from coordinator.vllm_backend import VllmBackend
from shared.mapping import MoleMapping, WorkerSpec, parse_mapping

DOC: dict[str, Any] = {
    "version": 1,
    "base_model": "/models/base",
    "coordinator": {"url": "http://127.0.0.1:8000"},
    "router": {"adapter": "/vol/router", "labels": {"0": "calendar"}},
    "adapters": {"calendar": {"label": "0", "lora": "/vol/calendar"}},
    "workers": [
        {"id": "dynamic-0", "url": "http://127.0.0.1:8101", "mode": "dynamic", "adapters": ["calendar"]}
    ],
}


def _mapping(**worker: Any) -> MoleMapping:
    doc = copy.deepcopy(DOC)
    doc["workers"][0].update(worker)
    return parse_mapping(doc, base_dir="/")


def test_a_worker_moved_to_vllm_gets_a_vllm_backend_and_an_unchanged_one_keeps_its_replica() -> None:
    client = httpx.AsyncClient()

    def factory(spec: WorkerSpec) -> HttpBackend | VllmBackend:
        if spec.engine == "vllm":
            return VllmBackend(spec, client, token=None, adapter_spec=lambda _n: None)
        return HttpBackend(spec, client, token=None)

    dispatcher = Dispatcher(_mapping(), factory, CoordinatorMetrics())
    first = dispatcher.replicas()[0]
    first.times_ejected = 3
    dispatcher.update(_mapping(max_concurrency=4))  # not how it is called: the same replica
    assert dispatcher.replicas()[0] is first and first.spec.max_concurrency == 4
    dispatcher.update(_mapping(engine="vllm", max_model_len=512))
    moved = dispatcher.replicas()[0]
    assert moved is not first and isinstance(moved.backend, VllmBackend) and moved.times_ejected == 0
    dispatcher.update(_mapping(engine="vllm", max_model_len=1024))
    assert dispatcher.replicas()[0] is not moved
