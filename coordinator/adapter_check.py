"""The check of what a vLLM worker serves: every adapter's answer to the probe of
:mod:`shared.adapter_probe`, against the HF + PEFT reference recorded next to the adapter.

vLLM can load a LoRA and not apply it (weights on modules it does not map, e.g. the vision
tower), or apply the wrong one. So before a vLLM worker's adapter is routed to, the coordinator
asks the worker for the log-probabilities of the recorded answer's tokens (teacher-forced, one
answer start at a time with ``continue_final_message``; the probe image at its fixed size) and
compares them with the adapter's and the base model's (:func:`~shared.adapter_probe.verdict`).

Each adapter is checked once per server start (:meth:`AdapterChecker.reset` when the server is seen
down). Outcomes, in ``GET /workers`` as ``adapter_checks``:

- ``ok``: routed;
- ``inconsistent: <why>``: not routed to this worker (it counts as missing there);
- ``unverified: <why>``: no record to compare with (``mole probe-adapters`` writes them): routed,
  with a warning;
- a check that could not run (the worker failed it) is retried at the next probe; until then the
  adapter is not routed there.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import httpx

from coordinator.vllm_api import LogprobsFailed, next_token_logprobs
from shared.adapter_probe import PROBE_SIZE, ProbeRecord, is_informative, probe_image, read_record, verdict
from shared.images import encode_image_b64

logger = logging.getLogger(__name__)

CHECK_TIMEOUT_S = 60.0  # one adapter's check (its first request may wait for the engine)
FolderOf = Callable[[str, str | None], str | None]  # (served name, vLLM's root for it) -> LoRA folder


class AdapterChecker:
    """The checks of one vLLM worker's adapters."""

    def __init__(
        self,
        worker_id: str,
        url: str,
        client: httpx.AsyncClient,
        headers: dict[str, str],
        folder_of: FolderOf,
    ):
        self.worker_id = worker_id
        self._url = url
        self._client = client
        self._headers = headers
        self._folder_of = folder_of
        self.results: dict[str, str] = {}  # served name -> "ok" | "inconsistent: ..." | "unverified: ..."
        self._image: str | None = None

    def reset(self) -> None:
        """The server went away: what it serves when it is back is checked again."""
        self.results.clear()

    def routable(self, name: str) -> bool:
        outcome = self.results.get(name)
        return outcome is not None and not outcome.startswith("inconsistent")

    async def check(self, served: dict[str, str | None]) -> None:
        """Check the served names (name -> vLLM's root folder) not checked since the server started."""
        todo = [name for name in served if name not in self.results]
        outcomes = await asyncio.gather(*(self._check(name, served[name]) for name in todo))
        for name, outcome in zip(todo, outcomes, strict=True):
            if outcome is None:
                continue  # could not run: again at the next probe
            self.results[name] = outcome
            log = logger.info if outcome == "ok" else logger.warning
            log("adapter check %s: %s", name, outcome, extra={"worker_id": self.worker_id})

    async def _check(self, name: str, root: str | None) -> str | None:
        folder = self._folder_of(name, root)
        try:
            record = read_record(folder) if folder is not None else None
        except ValueError as exc:
            return f"unverified: its probe record is unreadable ({exc})"
        if record is None:
            return "unverified: no probe record next to the adapter (run `mole probe-adapters`)"
        try:
            logprobs = await self._logprobs(name, record)
        except _CheckFailed as exc:
            logger.warning(
                "adapter check %s could not run: %s", name, exc, extra={"worker_id": self.worker_id}
            )
            return None
        except _Mismatch as exc:
            return f"inconsistent: {exc}"
        why = verdict(record, logprobs)
        if why is not None:
            return f"inconsistent: {why}"
        if not is_informative(record):
            return "unverified: it answers as its HF reference, but the probe does not tell it from the base model"
        return "ok"

    async def _logprobs(self, name: str, record: ProbeRecord) -> list[float]:
        """The worker's log-probabilities of the record's answer tokens under ``name``, one answer
        start at a time (see :func:`~coordinator.vllm_api.next_token_logprobs`)."""
        if self._image is None:
            self._image = "data:image/png;base64," + encode_image_b64(probe_image())
        user = [
            {"type": "image_url", "image_url": {"url": self._image}},
            {"type": "text", "text": record.prompt},
        ]
        body: dict[str, Any] = {
            "model": name,
            "messages": [{"role": "user", "content": user}],
            "mm_processor_kwargs": {"size": PROBE_SIZE},
        }

        async def step(k: int) -> float:
            token = record.answer_ids[k]
            try:
                found, prompt_ids = await next_token_logprobs(
                    self._client,
                    self._url,
                    body,
                    record.starts[k] if k else None,
                    [token],
                    headers=self._headers,
                    timeout_s=CHECK_TIMEOUT_S,
                )
            except LogprobsFailed as exc:
                raise _CheckFailed(str(exc)) from None
            expected = record.prompt_ids + record.answer_ids[:k]
            if prompt_ids != expected:
                raise _Mismatch(
                    f"the worker renders the probe as {len(prompt_ids)} tokens, the HF reference as "
                    f"{len(expected)} (another chat template, tokenizer or image processing)"
                    if len(prompt_ids) != len(expected)
                    else "the worker renders the probe as other tokens than the HF reference"
                )
            return found[token]

        return list(await asyncio.gather(*(step(k) for k in range(len(record.answer_ids)))))


class _CheckFailed(Exception):
    """The check could not run (the worker's fault or a transport failure): try again later."""


class _Mismatch(Exception):
    """The worker does not see the probe as the reference did."""
