"""Helpers on vLLM's public OpenAI API shared by the coordinator's vLLM users: the backend
(:mod:`coordinator.vllm_backend`), the router (:mod:`coordinator.vllm_router`) and the adapter check
(:mod:`coordinator.adapter_check`)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import httpx


def data_url(image_b64: str) -> str:
    """A data URL for vLLM (mole's wire takes plain base64 too; vLLM reads the bytes, not the type)."""
    if image_b64.startswith("data:"):
        return image_b64
    kind = "jpeg" if image_b64.startswith("/9j/") else "png"
    return f"data:image/{kind};base64,{image_b64}"


class LogprobsFailed(Exception):
    """A log-probability request to a vLLM server failed (transport, status or answer shape)."""


async def next_token_logprobs(
    client: httpx.AsyncClient,
    url: str,
    body: dict[str, Any],
    prefix: str | None,
    tokens: Sequence[int],
    *,
    headers: dict[str, str],
    timeout_s: float,
) -> tuple[dict[int, float], list[int]]:
    """The log-probabilities of ``tokens`` as the next token of the answer, and the prompt's token
    ids as vLLM rendered them. ``body`` holds the model, the messages and any processor settings;
    ``prefix`` is the start of the assistant's answer already written (None: the answer's first
    token), continued with ``continue_final_message``.

    One ordinary generation step (``max_tokens`` 1, ``logprob_token_ids``): vLLM 0.32 with LoRA
    enabled crashes its engine on ``prompt_logprobs`` when other requests share the batch (its
    LoRA logits processor gets one index per request for every prompt position), so a sequence is
    scored one prefix at a time instead, never with ``prompt_logprobs``."""
    request: dict[str, Any] = {
        **body,
        "max_tokens": 1,
        "temperature": 0.0,
        "logprobs": True,
        "logprob_token_ids": sorted(set(tokens)),
        "return_tokens_as_token_ids": True,  # "token_id:<id>": no decoding ambiguity
        "return_token_ids": True,  # prompt_token_ids, to check the prefix rendered as expected
    }
    if prefix is not None:
        request["messages"] = [*body["messages"], {"role": "assistant", "content": prefix}]
        request["add_generation_prompt"] = False
        request["continue_final_message"] = True
    try:
        async with asyncio.timeout(timeout_s):
            resp = await client.post(
                f"{url}/v1/chat/completions",
                json=request,
                headers=headers,
                timeout=httpx.Timeout(timeout_s, connect=min(timeout_s, 5.0)),
            )
    except (httpx.HTTPError, TimeoutError) as exc:
        raise LogprobsFailed(f"{type(exc).__name__} calling it") from None
    if resp.status_code != 200:
        raise LogprobsFailed(f"it answered HTTP {resp.status_code}: {resp.text[:200]}")
    try:
        answer = resp.json()
        tops = answer["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
        found = {int(t["token"].removeprefix("token_id:")): float(t["logprob"]) for t in tops}
        prompt_ids = [int(i) for i in answer["prompt_token_ids"]]
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        raise LogprobsFailed("its answer has no log-probabilities for the asked tokens") from None
    if missing := [t for t in tokens if t not in found]:
        raise LogprobsFailed(f"its answer lacks the log-probabilities of tokens {missing}")
    return found, prompt_ids
