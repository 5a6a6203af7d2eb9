"""``VllmBackend``: a worker that is a vLLM OpenAI-compatible server (a mapping worker with
``"engine": "vllm"``), reached through vLLM's public API only.

- ``infer``: ``POST /v1/chat/completions`` with ``model`` = the adapter (a merged worker serves its
  checkpoint under the adapter's name, a dynamic one each LoRA under its own), the image as a
  ``data:`` URL, the system prompt (the request's, else the adapter's from the mapping), history,
  ``max_tokens``, ``temperature`` (0: greedy), ``top_p``, ``stop`` and ``seed``.
- ``stream``: the same request with ``"stream": true``; vLLM's server-sent events become
  :class:`InferStreamEvent`\\ s. Entering waits for the first piece of text, as for mole's workers.
- ``health``: ``GET /health`` (200 once the engine runs), then ``GET /v1/models``: the adapters
  really loaded (the served model names), each reported once it passed its check against the HF
  reference (:mod:`coordinator.adapter_check`).

vLLM's statuses go through :func:`~coordinator.backends.read_answer` like a mole worker's: its 404
("the model does not exist") is ``adapter_missing``, 401 is our token refused, 429/5xx are retried
elsewhere, and any other 4xx (400: a prompt too long for ``--max-model-len``, a bad image) is the
client's, with vLLM's message. vLLM's usage counts the image's tokens in ``prompt_tokens``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
from pydantic import BaseModel, ConfigDict, ValidationError

from coordinator.adapter_check import AdapterChecker
from coordinator.backends import (
    PROBE_TIMEOUT_S,
    AttemptFailed,
    CallContext,
    EventStream,
    Failure,
    Probe,
    _json_or_none,
    _retry_after,
    _transport_failures,
    ms_since,
    read_answer,
)
from coordinator.vllm_api import data_url
from shared.mapping import ROUTER_MODEL_NAME, AdapterSpec, WorkerSpec
from shared.schemas import (
    REQUEST_ID_HEADER,
    AdapterInfo,
    ErrorBody,
    InferRequest,
    InferResponse,
    InferStreamEvent,
)

AdapterLookup = Callable[[str], AdapterSpec | None]  # the adapter's entry in the mapping in force
DEFAULT_MAX_TOKENS = 1024  # a request and its adapter set no length (a mole worker's default cap)
# Special-token strings in client text are broken as mole's workers break them (shared.modeling's
# neutralise_special_tokens), so client text cannot forge turns or image placeholders on vLLM either.
# The coordinator holds no tokenizer for the worker's model: every Qwen-style "<|...|>" is broken.
_SPECIAL = re.compile(r"<\|[^<>|\s]{1,64}\|>")
_NEUTRALISER = "\u200b"
# vLLM's error bodies carry no mole code; the status gives it (the others: worker_error).
_CODES = {400: "invalid_input", 413: "payload_too_large", 422: "unprocessable_request"}


def _neutralise(text: str) -> str:
    return _SPECIAL.sub(lambda m: m.group(0)[0] + _NEUTRALISER + m.group(0)[1:], text)


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")  # vLLM's own wire types: only what mole reads


class _Message(_Lenient):
    content: str | None = None


class _Choice(_Lenient):
    message: _Message | None = None
    delta: _Message | None = None
    finish_reason: str | None = None


class _Usage(_Lenient):
    prompt_tokens: int = 0
    completion_tokens: int = 0


class _Completion(_Lenient):
    """A chat completion, or one chunk of a streamed one."""

    choices: list[_Choice] = []
    usage: _Usage | None = None


class _Model(_Lenient):
    id: str
    parent: str | None = None  # a LoRA's base model; None for the base itself
    root: str | None = None  # where it was loaded from (a LoRA's folder)


class _Models(_Lenient):
    data: list[_Model]


def _vllm_error(status: int, body: dict[str, Any] | None) -> dict[str, Any] | None:
    """vLLM's error body (``{"error": {"message", "type", "code": <status>}}`` or FastAPI's
    ``{"detail": ...}``) in mole's shape, for :func:`read_answer`."""
    if body is None:
        return None
    error = body.get("error")
    message = error.get("message") if isinstance(error, dict) else body.get("detail") or error
    return {"error": {"code": _CODES.get(status, "worker_error"), "message": str(message or "")}}


class VllmBackend:
    """One vLLM OpenAI server. ``adapter_spec`` looks an adapter up in the mapping in force (its
    system prompt and answer length); ``token`` is the server's ``--api-key`` (mole's worker token)."""

    def __init__(
        self,
        spec: WorkerSpec,
        client: httpx.AsyncClient,
        *,
        token: str | None,
        adapter_spec: AdapterLookup,
    ):
        self.worker_id = spec.id
        self.url = spec.url
        self.mode = spec.mode
        self.max_model_len = spec.max_model_len
        self._client = client
        self._auth = {"Authorization": f"Bearer {token}"} if token else {}  # vLLM's --api-key
        self._adapter_spec = adapter_spec
        self.checker = AdapterChecker(spec.id, spec.url, client, self._auth, self._probe_folder)

    def _probe_folder(self, name: str, root: str | None) -> str | None:
        """Where ``name``'s probe record is: its LoRA folder in the mapping, else the folder vLLM
        loaded it from (a hot-loaded LoRA)."""
        spec = self._adapter_spec(name)
        if spec is not None:
            return spec.lora
        return root if self.mode == "dynamic" else None

    # ---- requests ------------------------------------------------------------------------------
    def _body(self, request: InferRequest, *, stream: bool) -> dict[str, Any]:
        spec = self._adapter_spec(request.adapter)
        system = _neutralise(request.system_prompt) if request.system_prompt is not None else None
        if system is None and spec is not None:
            system = spec.system_prompt
        messages: list[dict[str, Any]] = [{"role": "system", "content": system}] if system is not None else []
        messages += [{"role": t.role, "content": _neutralise(t.text)} for t in request.history]
        content: list[dict[str, Any]] = []
        if request.image_b64 is not None:
            content.append({"type": "image_url", "image_url": {"url": data_url(request.image_b64)}})
        content.append({"type": "text", "text": _neutralise(request.prompt)})
        messages.append({"role": "user", "content": content})
        default = (spec.max_new_tokens if spec else None) or DEFAULT_MAX_TOKENS
        cap = spec.max_new_tokens_cap if spec and spec.max_new_tokens_cap else None
        max_tokens = request.max_new_tokens or default
        body: dict[str, Any] = {
            "model": request.adapter,
            "messages": messages,
            "max_tokens": min(max_tokens, cap) if cap else max_tokens,
            "temperature": request.temperature or 0.0,  # 0: greedy, as mole's workers
        }
        if request.max_new_tokens is None and self.max_model_len and body["max_tokens"] >= self.max_model_len:
            del body["max_tokens"]  # a default beyond the context: vLLM's own, what the context leaves
        if request.top_p is not None:
            body["top_p"] = request.top_p
        if request.stop:
            body["stop"] = list(request.stop)
        if request.seed is not None:
            body["seed"] = request.seed
        if stream:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
        return body

    def _request(self, request: InferRequest, call: CallContext, *, stream: bool) -> httpx.Request:
        headers = {REQUEST_ID_HEADER: call.request_id, **self._auth}
        return self._client.build_request(
            "POST",
            f"{self.url}/v1/chat/completions",
            json=self._body(request, stream=stream),
            headers=headers,
            timeout=httpx.Timeout(call.timeout_s, connect=min(call.connect_timeout_s, call.timeout_s)),
        )

    def _answer(self, request: InferRequest, completion: _Completion, text: str, t0: float) -> InferResponse:
        finish = completion.choices[0].finish_reason if completion.choices else None
        usage = completion.usage or _Usage()
        return InferResponse(
            output=text,
            adapter=request.adapter,
            mode=self.mode,
            worker_id=self.worker_id,
            tokens_generated=usage.completion_tokens,
            prompt_tokens=usage.prompt_tokens,  # vLLM counts the image's tokens here
            finish_reason="length" if finish == "length" else "stop",
            timings_ms={"total": ms_since(t0)},
        )

    def _failed(self, resp: httpx.Response) -> None:
        """Raise the outcome of a non-200 answer (its body already read)."""
        read_answer(
            self.worker_id,
            resp.status_code,
            _vllm_error(resp.status_code, _json_or_none(resp)),
            retry_after=_retry_after(resp),
        )

    async def infer(self, request: InferRequest, call: CallContext) -> InferResponse:
        t0 = time.perf_counter()
        with _transport_failures(call):
            async with asyncio.timeout(call.timeout_s):
                resp = await self._client.send(self._request(request, call, stream=False))
        if resp.status_code != 200:
            self._failed(resp)

        def parse() -> InferResponse:
            completion = _Completion.model_validate_json(resp.content)
            message = completion.choices[0].message if completion.choices else None
            if message is None or message.content is None:
                raise ValueError("no message in the completion")
            return self._answer(request, completion, message.content, t0)

        return read_answer(self.worker_id, 200, None, parse=parse)

    @contextlib.asynccontextmanager
    async def stream(self, request: InferRequest, call: CallContext) -> AsyncIterator[EventStream]:
        """Server-sent events of a streamed chat completion; entering waits for the first text."""
        t0 = time.perf_counter()
        with _transport_failures(call):
            async with asyncio.timeout(call.timeout_s):
                resp = await self._client.send(self._request(request, call, stream=True), stream=True)
        try:
            if resp.status_code != 200:
                with _transport_failures(call):
                    await resp.aread()
                self._failed(resp)
            events = self._events(request, resp, call, t0)
            with _transport_failures(call):
                async with asyncio.timeout(call.timeout_s):  # until the first token
                    first = await anext(events, None)
            if first is None:
                raise AttemptFailed(Failure.BAD_RESPONSE)
            yield _replay(first, events)
        finally:
            await resp.aclose()

    async def _events(
        self, request: InferRequest, resp: httpx.Response, call: CallContext, t0: float
    ) -> EventStream:
        text: list[str] = []
        last = _Completion()
        with _transport_failures(call):
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                try:
                    chunk = json.loads(data)
                    if isinstance(chunk, dict) and isinstance(chunk.get("error"), dict):
                        error = chunk["error"]
                        yield InferStreamEvent(
                            error=ErrorBody(code="worker_error", message=str(error.get("message") or ""))
                        )
                        return
                    completion = _Completion.model_validate(chunk)
                except (ValueError, ValidationError):
                    raise AttemptFailed(Failure.BAD_RESPONSE) from None
                for choice in completion.choices:
                    piece = choice.delta.content if choice.delta is not None else None
                    if piece:
                        text.append(piece)
                        yield InferStreamEvent(delta=piece)
                    if choice.finish_reason is not None:
                        last.choices = [choice]
                if completion.usage is not None:
                    last.usage = completion.usage
        yield InferStreamEvent(final=self._answer(request, last, "".join(text), t0))

    # ---- health --------------------------------------------------------------------------------
    async def health(self) -> Probe:
        t0 = time.perf_counter()
        try:
            alive = await self._client.get(f"{self.url}/health", timeout=PROBE_TIMEOUT_S)
            if alive.status_code != 200:  # vLLM answers /health only once its engine runs
                self.checker.reset()
                return Probe("loading" if alive.status_code == 503 else "down", latency_ms=ms_since(t0))
            resp = await self._client.get(
                f"{self.url}/v1/models", headers=self._auth, timeout=PROBE_TIMEOUT_S
            )
        except httpx.HTTPError as exc:
            self.checker.reset()
            return Probe("down", latency_ms=ms_since(t0), error=type(exc).__name__)
        latency = ms_since(t0)
        if resp.status_code != 200:
            return Probe("down", latency_ms=latency, error=f"models_http_{resp.status_code}")
        try:
            models = _Models.model_validate_json(resp.content)
        except ValidationError:
            return Probe("down", latency_ms=latency, error="bad_models_body")
        # What it serves: a merged worker's checkpoint under the adapter's name, a dynamic one's
        # LoRAs (its base model is not an adapter, nor the router's LoRA). vLLM reports no weight
        # hashes. Each is checked against its HF reference before it counts (coordinator.adapter_check).
        served = {
            m.id: m.root
            for m in models.data
            if (self.mode == "merged" or m.parent is not None) and m.id != ROUTER_MODEL_NAME
        }
        await self.checker.check(served)
        adapters = [AdapterInfo(name=n, sha256="") for n in served if self.checker.routable(n)]
        checks = {n: self.checker.results[n] for n in served if n in self.checker.results}
        return Probe("up", adapters=adapters, latency_ms=latency, checks=checks)


async def _replay(first: InferStreamEvent, rest: EventStream) -> EventStream:
    yield first
    async for event in rest:
        yield event
