"""Pure units: replica choice, retries, fallback and ejection; the router's decision policy; the HTTP
backend's reading of worker answers; OpenAI request translation. No model, no processes.

Backends here are fault-injection doubles: they return scripted outcomes per worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest

from coordinator.backends import (
    AttemptFailed,
    AttemptTimedOut,
    CallContext,
    Failure,
    HttpBackend,
    Probe,
    read_answer,
    read_error,
)
from coordinator.dispatch import Dispatcher
from coordinator.metrics import CoordinatorMetrics
from coordinator.openai_compat import ChatCompletionRequest, to_classify
from coordinator.router import RouteScores, decide
from shared.errors import (
    AdapterNotFound,
    ForwardedError,
    GenerationFailed,
    InvalidInput,
    MoleError,
    NoConfidentRoute,
    NotReady,
    NoWorkerAvailable,
    Overloaded,
    WorkerTimeout,
)
from shared.mapping import MoleMapping, WorkerSpec, parse_mapping
from shared.schemas import DEADLINE_HEADER, AdapterInfo, InferRequest, InferResponse, Mode

Outcome = Exception | None  # None: answer successfully


def make_mapping(tmp_path: Path, **dispatch: Any) -> MoleMapping:
    doc = {
        "base_model": "base",
        "router": {"adapter": "router", "labels": {"0": "calendar", "1": "login"}},
        "adapters": {
            "calendar": {"label": "0", "lora": "l/cal", "hot": True, "merged": "m/cal"},
            "login": {"label": "1", "lora": "l/login"},
        },
        "workers": [
            {"id": "merged-a", "url": "http://127.0.0.1:9001", "mode": "merged", "adapters": ["calendar"]},
            {"id": "merged-b", "url": "http://127.0.0.1:9002", "mode": "merged", "adapters": ["calendar"]},
            {
                "id": "dynamic-0",
                "url": "http://127.0.0.1:9003",
                "mode": "dynamic",
                "adapters": ["calendar", "login"],
            },
        ],
        "dispatch": {"eject_after_failures": 2, "eject_base_s": 30.0, **dispatch},
    }
    return parse_mapping(doc, base_dir=tmp_path, env={})


class ScriptedBackend:
    """Answers from a per-call script (fault injection); records the calls it got."""

    def __init__(self, spec: WorkerSpec, script: list[Outcome]):
        self.worker_id = spec.id
        self.mode: Mode = spec.mode
        self.script = script
        self.calls = 0

    async def infer(self, request: InferRequest, ctx: CallContext) -> InferResponse:
        self.calls += 1
        outcome = self.script.pop(0) if self.script else None
        if outcome is not None:
            raise outcome
        return InferResponse(
            output="ok",
            adapter=request.adapter,
            mode=self.mode,
            worker_id=self.worker_id,
            tokens_generated=1,
            timings_ms={},
        )

    async def health(self) -> Probe:
        return Probe("up", adapters=[AdapterInfo(name=n, sha256="x") for n in ("calendar", "login")])


def make_dispatcher(
    mapping: MoleMapping, scripts: dict[str, list[Outcome]]
) -> tuple[Dispatcher, dict[str, ScriptedBackend]]:
    backends: dict[str, ScriptedBackend] = {}

    def factory(spec: WorkerSpec) -> ScriptedBackend:
        backends[spec.id] = ScriptedBackend(spec, scripts.get(spec.id, []))
        return backends[spec.id]

    return Dispatcher(mapping, factory, CoordinatorMetrics()), backends


def run(
    dispatcher: Dispatcher, adapter: str = "calendar", prefer_merged: bool = True, budget: float = 10.0
) -> Any:
    req = InferRequest(image_b64="x", prompt="p", adapter=adapter)
    return asyncio.run(
        dispatcher.dispatch(
            req, prefer_merged=prefer_merged, request_id="r1", deadline=time.monotonic() + budget
        )
    )


# ---- dispatch -----------------------------------------------------------------------------------


def test_broken_answers_everywhere_are_a_502(tmp_path: Path) -> None:
    from shared.errors import WorkerError

    broken = [AttemptFailed("http_500"), AttemptFailed("bad_response")]
    d, _ = make_dispatcher(
        make_mapping(tmp_path),
        {"merged-a": [broken[0]], "merged-b": [broken[1]], "dynamic-0": [AttemptFailed("http_500")] * 2},
    )
    with pytest.raises(WorkerError) as err:
        run(d)
    assert err.value.status == 502 and "calendar" in err.value.message


def test_retry_budget_stops_a_retry_storm(tmp_path: Path) -> None:
    from coordinator.admission import RetryBudget

    failing = {w: [AttemptFailed("http_503")] * 100 for w in ("merged-a", "merged-b", "dynamic-0")}
    d, backends = make_dispatcher(make_mapping(tmp_path), failing)
    d.budget = RetryBudget(ratio=0.2, floor=2)
    reasons = []
    for _ in range(10):
        with pytest.raises(NoWorkerAvailable) as err:
            run(d)
        reasons += [t["reason"] for t in err.value.details["tried"]]
    calls = sum(b.calls for b in backends.values())
    # 10 first attempts, and retries only within 2 + 20% of 10 requests
    assert calls <= 10 + 2 + 2
    assert "retry_budget_exhausted" in reasons


def test_busy_replicas_make_requests_wait_for_a_slot_not_fail(tmp_path: Path) -> None:
    mapping = make_mapping(tmp_path)
    for w in mapping.workers:
        w.max_concurrency = 1
    d, backends = make_dispatcher(mapping, {})
    gate = asyncio.Event()
    original = ScriptedBackend.infer

    async def slow(self: ScriptedBackend, request: InferRequest, ctx: CallContext) -> InferResponse:
        await gate.wait()
        return await original(self, request, ctx)

    for b in backends.values():
        b.infer = slow.__get__(b)  # type: ignore[method-assign]

    async def scenario() -> list[Any]:
        req = InferRequest(image_b64="x", prompt="p", adapter="calendar")
        tasks = [
            asyncio.create_task(
                d.dispatch(req, prefer_merged=True, request_id=str(i), deadline=time.monotonic() + 10)
            )
            for i in range(6)
        ]
        await asyncio.sleep(0.05)
        assert d.slots.waiting == 4 and sum(r.in_flight for r in d.replicas()) == 2
        gate.set()
        return await asyncio.gather(*tasks)

    served = asyncio.run(scenario())
    assert all(not s.degraded for s in served)  # busy is not broken: no fallback to dynamic
    assert {s.worker_id for s in served} == {"merged-a", "merged-b"}
    assert d.slots.waiting == 0


def test_an_autoscaled_worker_takes_every_containers_worth(tmp_path: Path) -> None:
    """Capacity is max_containers x max_concurrency, and least-loaded compares fractions of it."""
    mapping = make_mapping(tmp_path)
    big, small = mapping.workers[0], mapping.workers[1]
    big.max_concurrency, big.max_containers = 2, 4  # a Modal app: one URL, up to 4 containers
    small.max_concurrency, small.max_containers = 2, 1
    d, _ = make_dispatcher(mapping, {})
    replicas = {r.spec.id: r for r in d.replicas()}
    assert (big.capacity, small.capacity) == (8, 2)
    replicas["merged-a"].in_flight, replicas["merged-b"].in_flight = 3, 1  # 3/8 < 1/2
    assert replicas["merged-a"].has_slot and replicas["merged-b"].has_slot
    first = d.slots.order(d.plan("calendar", True)[0], set(), time.monotonic())[0]
    assert first.spec.id == "merged-a"
    assert d.view()[0]["capacity"] == 8


def test_a_workers_429_holds_it_at_what_it_accepted_for_retry_after(tmp_path: Path) -> None:
    mapping = make_mapping(tmp_path)
    d, _ = make_dispatcher(mapping, {})
    replica = d.replicas()[0]
    replica.in_flight = 5  # the request refused with 429 included
    now = time.monotonic()
    replica.throttle(2.0, now)
    assert replica.limit(now) == 4 and replica.limit(now + 2.1) == replica.spec.capacity
    replica.in_flight = 4
    assert not replica.has_slot


def test_probes_of_different_containers_do_not_flip_the_reported_adapters(tmp_path: Path) -> None:
    """An autoscaled app's probes land on different containers; one of them got a hot-loaded
    adapter first. The view is the union over the report window, so it does not flip."""
    from coordinator import replicas as replicas_module

    d, _ = make_dispatcher(make_mapping(tmp_path), {})
    replica = next(r for r in d.replicas() if r.spec.id == "dynamic-0")
    both = [AdapterInfo(name="calendar", sha256="a"), AdapterInfo(name="login", sha256="b")]
    hot = [*both, AdapterInfo(name="extra", sha256="c")]
    views = []
    for i in range(6):
        container = "c1" if i % 2 else "c2"
        d.prober.record(replica, Probe("up", adapters=hot if container == "c1" else both, instance=container))
        row = next(w for w in d.view() if w["id"] == "dynamic-0")
        views.append(
            ([a["name"] for a in row["reported_adapters"]], row["extra_adapters"], row["instances_seen"])
        )
    assert views[1:] == [(["calendar", "extra", "login"], ["extra"], 2)] * 5
    assert replica.holds("calendar") and replica.holds("login")
    # past the window, what no container reports any more is gone
    for name, (_, info) in list(replica.seen.items()):
        replica.seen[name] = (time.monotonic() - replicas_module.REPORT_WINDOW_S - 1, info)
    replica.instances = {k: 0.0 for k in replica.instances}
    d.prober.record(replica, Probe("up", adapters=both, instance="c2"))
    row = next(w for w in d.view() if w["id"] == "dynamic-0")
    assert [a["name"] for a in row["reported_adapters"]] == ["calendar", "login"] and row[
        "instances_seen"
    ] == 1


def test_too_many_waiting_requests_get_429(tmp_path: Path) -> None:
    mapping = make_mapping(tmp_path)
    for w in mapping.workers:
        w.max_concurrency = 1
    d, _ = make_dispatcher(mapping, {})
    d.slots.max_waiting = 1
    for r in d.replicas():
        r.in_flight = 1  # every slot taken

    with pytest.raises(Overloaded):

        async def two_waiters() -> None:
            req = InferRequest(image_b64="x", prompt="p", adapter="calendar")
            first = asyncio.create_task(
                d.dispatch(req, prefer_merged=True, request_id="a", deadline=time.monotonic() + 0.5)
            )
            await asyncio.sleep(0.05)
            try:
                await d.dispatch(req, prefer_merged=True, request_id="b", deadline=time.monotonic() + 0.5)
            finally:
                first.cancel()

        asyncio.run(two_waiters())


def test_safe_failure_is_retried_once_on_a_different_merged_replica(tmp_path: Path) -> None:
    d, backends = make_dispatcher(make_mapping(tmp_path), {"merged-a": [AttemptFailed("http_503")]})
    served = run(d)
    assert served.worker_id == "merged-b" and not served.degraded
    assert served.path == ["merged-a:http_503", "merged-b:ok"]
    assert backends["dynamic-0"].calls == 0


def test_no_merged_replica_left_falls_back_to_dynamic_degraded(tmp_path: Path) -> None:
    scripts: dict[str, list[Outcome]] = {
        "merged-a": [AttemptFailed("connect_error")],
        "merged-b": [AttemptFailed("read_error")],
    }
    d, _ = make_dispatcher(make_mapping(tmp_path), scripts)
    served = run(d)
    assert served.worker_id == "dynamic-0" and served.degraded and served.response.mode == "dynamic"
    states = {r.spec.id: r.state for r in d.replicas()}
    assert states["merged-a"] == "down"  # a refused connection fails over at once
    assert states["merged-b"] == "unknown"  # a read error alone says nothing about liveness


def test_without_dynamic_fallback_nothing_left_is_503_naming_adapter_and_workers(tmp_path: Path) -> None:
    scripts: dict[str, list[Outcome]] = {
        "merged-a": [AttemptFailed("http_502")],
        "merged-b": [AttemptFailed("http_503")],
    }
    d, backends = make_dispatcher(make_mapping(tmp_path, fallback_to_dynamic=False), scripts)
    with pytest.raises(NoWorkerAvailable) as err:
        run(d)
    assert err.value.details["adapter"] == "calendar"
    assert [t["worker"] for t in err.value.details["tried"]] == ["merged-a", "merged-b"]
    assert "merged-a (http_502)" in err.value.message
    assert backends["dynamic-0"].calls == 0


def test_prefer_merged_false_uses_dynamic_first_without_degrading(tmp_path: Path) -> None:
    d, _ = make_dispatcher(make_mapping(tmp_path), {})
    served = run(d, prefer_merged=False)
    assert served.worker_id == "dynamic-0" and not served.degraded


def test_least_in_flight_ready_replica_is_chosen(tmp_path: Path) -> None:
    d, _ = make_dispatcher(make_mapping(tmp_path), {})
    asyncio.run(d.prober.probe_all())
    next(r for r in d.replicas() if r.spec.id == "merged-a").in_flight = 3
    assert run(d).worker_id == "merged-b"


def test_worker_4xx_is_passed_through_without_retry(tmp_path: Path) -> None:
    rejected = ForwardedError("merged-a", 400, "invalid_input", "no")
    d, backends = make_dispatcher(make_mapping(tmp_path), {"merged-a": [rejected]})
    with pytest.raises(ForwardedError) as err:
        run(d)
    assert err.value.status == 400 and err.value.code == "invalid_input"
    assert backends["merged-b"].calls == 0 and backends["dynamic-0"].calls == 0


def test_timeout_is_504_and_not_retried(tmp_path: Path) -> None:
    d, backends = make_dispatcher(make_mapping(tmp_path), {"merged-a": [AttemptTimedOut("slow")]})
    with pytest.raises(WorkerTimeout) as err:
        run(d)
    assert err.value.details["worker"] == "merged-a"
    assert backends["merged-b"].calls == 0


def test_every_replica_overloaded_is_429_with_retry_after(tmp_path: Path) -> None:
    d, _ = make_dispatcher(
        make_mapping(tmp_path), {"dynamic-0": [AttemptFailed("overloaded", retry_after=3.0)]}
    )
    with pytest.raises(Overloaded) as err:
        run(d, adapter="login")
    assert err.value.retry_after == 3.0


def test_consecutive_failures_eject_but_never_the_last_replica(tmp_path: Path) -> None:
    mapping = make_mapping(tmp_path, retries=0, fallback_to_dynamic=False)
    failing = [AttemptFailed("http_503") for _ in range(10)]
    d, _ = make_dispatcher(mapping, {"dynamic-0": list(failing), "merged-a": list(failing)})
    replicas = {r.spec.id: r for r in d.replicas()}
    for _ in range(2):
        with pytest.raises(NoWorkerAvailable):
            run(d, adapter="login")
    # dynamic-0 is login's only replica: it keeps failing but stays in service
    assert not replicas["dynamic-0"].ejected(time.monotonic())
    for _ in range(4):  # idle replicas take turns: merged-a fails each time, merged-b serves
        with contextlib.suppress(NoWorkerAvailable):
            run(d)  # calendar (retries=0)
    assert replicas["merged-a"].ejected(time.monotonic()) and replicas["merged-a"].times_ejected == 1
    assert run(d).worker_id == "merged-b"


def test_adapter_missing_on_worker_is_not_routed_there(tmp_path: Path) -> None:
    d, _ = make_dispatcher(make_mapping(tmp_path), {})
    asyncio.run(d.prober.probe_all())
    dyn = next(r for r in d.replicas() if r.spec.id == "dynamic-0")
    dyn.reported = [AdapterInfo(name="calendar", sha256="x")]
    assert dyn.missing() == ["login"]
    with pytest.raises(NoWorkerAvailable):
        run(d, adapter="login")
    assert next(w for w in d.view() if w["id"] == "dynamic-0")["missing_adapters"] == ["login"]


def test_spent_budget_is_504(tmp_path: Path) -> None:
    d, _ = make_dispatcher(make_mapping(tmp_path), {})
    with pytest.raises(WorkerTimeout):
        run(d, budget=-1.0)


# ---- HTTP backend -------------------------------------------------------------------------------


def http_backend(handler: Callable[[httpx.Request], httpx.Response]) -> tuple[HttpBackend, httpx.AsyncClient]:
    client = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    spec = WorkerSpec(id="w", url="http://127.0.0.1:9", mode="dynamic", adapters=["login"])
    return HttpBackend(spec, client, token="tok"), client


def call(handler: Callable[[httpx.Request], httpx.Response]) -> InferResponse:
    async def go() -> InferResponse:
        backend, client = http_backend(handler)
        async with client:
            req = InferRequest(image_b64="data:image/png;base64,AAAA", prompt="p", adapter="login")
            return await backend.infer(req, CallContext("rid-1", 2.5, 1.0))

    return asyncio.run(go())


def test_http_backend_sends_token_deadline_request_id_and_image_as_received() -> None:
    seen: dict[str, Any] = {}

    def handler(request: httpx.Request) -> httpx.Response:
        seen.update(headers=request.headers, body=json.loads(request.content))
        body = {"output": "o", "adapter": "login", "mode": "dynamic", "worker_id": "w", "tokens_generated": 1}
        return httpx.Response(200, json={**body, "timings_ms": {"total": 1.0}})

    assert call(handler).output == "o"
    assert seen["headers"]["authorization"] == "Bearer tok"
    assert seen["headers"]["x-request-id"] == "rid-1"
    assert seen["headers"][DEADLINE_HEADER.lower()] == "2500"
    assert seen["body"]["image_b64"] == "data:image/png;base64,AAAA"


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        (503, AttemptFailed),
        (502, AttemptFailed),
        (429, AttemptFailed),
        (404, AttemptFailed),  # the worker lacks an adapter the mapping assigns to it: another holder tries
        (422, ForwardedError),  # the request's own fault (e.g. unprocessable content)
        (500, AttemptFailed),  # a broken worker: retried elsewhere, 502 when all are broken
    ],
)
def test_http_backend_classifies_worker_statuses(status: int, expected: type[Exception]) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(
            status, json={"error": {"code": "x", "message": "m"}}, headers={"Retry-After": "2"}
        )

    with pytest.raises(expected):
        call(handler)


def test_http_backend_connect_error_is_a_safe_failure() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    with pytest.raises(AttemptFailed, match="connect_error"):
        call(handler)


E = TypeVar("E", bound=Exception)


def read_both_ways(error: MoleError, outcome: type[E]) -> tuple[E, E]:
    """The outcome of a worker's typed ``error`` read in process (``read_error``) and the same error
    answered over HTTP (its status and body, ``Retry-After: 3``); both must raise ``outcome``."""
    with pytest.raises(outcome) as in_process:
        read_error("w", error)

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(error.status, json=error.to_body(), headers={"Retry-After": "3"})

    with pytest.raises(outcome) as over_http:
        call(handler)
    return in_process.value, over_http.value


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (Overloaded("queue full", retry_after=3.0), "overloaded"),
        (NotReady("worker w is loading"), "http_503"),
        (GenerationFailed("generation failed: RuntimeError"), "http_500"),
    ],
)
def test_in_process_errors_read_like_http_answers(error: MoleError, reason: str) -> None:
    """One table for every backend: a worker's typed error in this process and the same error
    answered over HTTP give the same outcome."""
    in_process, over_http = read_both_ways(error, AttemptFailed)
    assert in_process.reason == over_http.reason == reason
    if reason == "overloaded":
        assert in_process.retry_after == over_http.retry_after == 3.0


def test_a_workers_client_error_is_forwarded_with_its_code_and_details() -> None:
    error = InvalidInput("image_b64: the model's image processor rejected the image", field="image_b64")
    for err in read_both_ways(error, ForwardedError):
        assert (err.status, err.code, err.worker_id) == (400, "invalid_input", "w")
        assert err.to_body() == error.to_body()


def test_a_workers_404_reads_the_same_in_process_and_over_http() -> None:
    error = AdapterNotFound("adapter 'x' is not held by worker w", adapters=["login"])
    in_process, over_http = read_both_ways(error, AttemptFailed)
    assert in_process.reason == over_http.reason == "adapter_missing"


def test_http_backend_reports_a_failed_load_with_its_error() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        body = {
            "status": "failed",
            "worker_id": "w",
            "mode": "dynamic",
            "adapters": [],
            "error": "OSError: gone",
        }
        return httpx.Response(503, json=body)

    async def go() -> Probe:
        backend, client = http_backend(handler)
        async with client:
            return await backend.health()

    probe = asyncio.run(go())
    assert probe.state == "failed" and probe.error == "OSError: gone"


# ---- router decision policy ---------------------------------------------------------------------


def scores(p0: float) -> RouteScores:
    return RouteScores(labels=("0", "1"), probabilities=(p0, 1.0 - p0))


def with_router(mapping: MoleMapping, **router: Any) -> MoleMapping:
    return mapping.model_copy(update={"router": mapping.router.model_copy(update=router)})


def test_router_decision_takes_the_top_label(tmp_path: Path) -> None:
    d = decide(make_mapping(tmp_path), scores(0.8), None)
    assert (d.adapter, d.label, d.routed_by, d.confidence) == ("calendar", "0", "router", 0.8)
    assert [c.adapter for c in d.top_k] == ["calendar", "login"]


def test_below_threshold_uses_fallback_or_is_422(tmp_path: Path) -> None:
    mapping = with_router(make_mapping(tmp_path), thresholds={"0": 0.9})
    with pytest.raises(NoConfidentRoute) as err:
        decide(mapping, scores(0.8), None)
    assert err.value.details["threshold"] == 0.9
    d = decide(with_router(mapping, fallback_adapter="login"), scores(0.8), None)
    assert (d.adapter, d.routed_by, d.router_choice) == ("login", "fallback", "calendar")


def test_explicit_expert_wins_and_shadow_records_the_router_choice(tmp_path: Path) -> None:
    mapping = with_router(make_mapping(tmp_path), shadow=True)
    d = decide(mapping, scores(0.9), "login")
    assert (d.adapter, d.routed_by, d.confidence, d.router_choice) == ("login", "explicit", None, "calendar")
    assert decide(mapping, None, "login").top_k == []


# ---- OpenAI translation -------------------------------------------------------------------------


HTTP_IMAGE = {"type": "image_url", "image_url": {"url": "https://example.com/y.png"}}


def chat(**kw: Any) -> ChatCompletionRequest:
    content = [
        {"type": "text", "text": "read it"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
    ]
    base: dict[str, Any] = {"model": "auto", "messages": [{"role": "user", "content": content}]}
    return ChatCompletionRequest.model_validate({**base, **kw})


def test_chat_request_translates_to_classify() -> None:
    req, sampling = to_classify(chat(max_tokens=7, temperature=0.5, user="someone"))
    assert (req.prompt, req.expert, req.max_new_tokens) == ("read it", None, 7)
    assert req.image_b64.startswith("data:image/png") and sampling.temperature == 0.5
    assert to_classify(chat(model="login"))[0].expert == "login"


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"frequency_penalty": 0.7}, "frequency_penalty"),
        ({"n": 2}, "n"),
        ({"messages": [{"role": "assistant", "content": "no user turn"}]}, "messages"),
        (
            {"messages": [{"role": "user", "content": [{"type": "text", "text": "t"}, HTTP_IMAGE]}]},
            "messages[0].content[1].image_url.url",
        ),
    ],
)
def test_chat_request_rejections_name_the_field(change: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidInput) as err:
        to_classify(chat(**change))
    assert field in err.value.message


def test_a_stale_loading_state_is_re_probed_before_giving_up(tmp_path: Path) -> None:
    """A worker last seen loading (the prober runs every few seconds) is probed again on demand."""
    d, backends = make_dispatcher(make_mapping(tmp_path), {})
    dyn = next(r for r in d.replicas() if r.spec.id == "dynamic-0")
    dyn.state = "loading"
    dyn.last_probe = time.time() - 1.0
    served = run(d, adapter="login")  # only dynamic-0 holds login; its health now says up
    assert served.worker_id == "dynamic-0" and dyn.state == "up"
    assert backends["dynamic-0"].calls == 1


def test_retry_budget_comes_from_the_dispatch_policy(tmp_path: Path) -> None:
    mapping = make_mapping(tmp_path, retry_budget_ratio=0.0, retry_budget_floor=0)
    d, backends = make_dispatcher(mapping, {"merged-a": [AttemptFailed("http_503")]})
    with pytest.raises(NoWorkerAvailable) as err:
        run(d)
    assert [t["reason"] for t in err.value.details["tried"]] == ["http_503", "retry_budget_exhausted"]
    assert backends["merged-b"].calls == 0  # no budget, no second attempt


def test_a_workers_404_for_an_assigned_adapter_is_tried_elsewhere(tmp_path: Path) -> None:
    with pytest.raises(AttemptFailed) as exc:
        read_answer("w", 404, {"error": {"code": "adapter_not_found", "message": "not held"}})
    assert exc.value.reason is Failure.ADAPTER_MISSING

    missing = AttemptFailed(Failure.ADAPTER_MISSING)
    dispatcher, backends = make_dispatcher(
        make_mapping(tmp_path), {"merged-a": [missing], "merged-b": [missing]}
    )
    served = run(dispatcher)
    assert served.worker_id == "dynamic-0" and served.degraded
    replicas = {r.spec.id: r for r in dispatcher.replicas()}
    for wid in (
        "merged-a",
        "merged-b",
    ):  # healthy workers that lack the adapter: not counted, not asked again
        assert replicas[wid].consecutive_failures == 0 and not replicas[wid].holds("calendar")
    assert run(dispatcher).worker_id == "dynamic-0"
    assert backends["merged-a"].calls == 1
