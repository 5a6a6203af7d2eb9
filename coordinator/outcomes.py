"""What a classify request becomes on its way: its :class:`Planned` dispatch, its answer
(:class:`Classified`) and, streamed, its :class:`ClassifyStream` after the first token."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from coordinator.backends import AttemptFailed, AttemptTimedOut, ms_since
from coordinator.dispatch import StreamDispatched
from coordinator.router import RouteDecision
from shared.errors import MoleError, WorkerError, WorkerTimeout
from shared.schemas import ChatTurn, ClassifyResponse, InferRequest, InferResponse

if TYPE_CHECKING:
    from coordinator.service import CoordinatorService


@dataclass(frozen=True)
class Sampling:
    """Decoding options and earlier turns forwarded to the worker (``None``: the worker's
    default, greedy) by the chat layer."""

    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    history: tuple[ChatTurn, ...] = ()


@dataclass(frozen=True)
class Planned:
    """A validated, routed request, ready to dispatch."""

    request_id: str
    decision: RouteDecision
    infer: InferRequest
    prefer_merged: bool
    deadline: float
    route_ms: float

    def response(
        self,
        worker_id: str,
        answer: InferResponse,
        *,
        path: list[str],
        degraded: bool,
        timings_ms: dict[str, float],
    ) -> ClassifyResponse:
        """The ``/classify`` answer once the worker answered."""
        d = self.decision
        return ClassifyResponse(
            request_id=self.request_id,
            adapter=d.adapter,
            label=d.label,
            confidence=d.confidence,
            routed_by=d.routed_by,
            worker_id=worker_id,
            mode=answer.mode,
            output=answer.output,
            finish_reason=answer.finish_reason,
            prompt_tokens=answer.prompt_tokens,
            completion_tokens=answer.tokens_generated,
            routing_path=[*d.path, *path],
            degraded=degraded,
            top_k=d.top_k,
            timings_ms=timings_ms,
        )


class ClassifyStream:
    """A streamed classify whose first token came: :meth:`events`, then :attr:`classified`."""

    def __init__(
        self,
        service: CoordinatorService,
        plan: Planned,
        served: StreamDispatched,
        router_version: str,
        t0: float,
    ):
        self.plan = plan
        self.adapter = plan.decision.adapter
        self.router_version = router_version
        self.classified: Classified | None = None  # set once the final answer came
        self._service = service
        self._served = served
        self._t0 = t0

    async def deltas(self) -> AsyncIterator[str]:
        """The answer's text, piece by piece as the worker produces it; at the end
        :attr:`classified` holds the whole answer.

        Whatever goes wrong midway is raised as a ``MoleError`` (the SSE layer sends it as an
        error event), counted in the statistics, and counted against the worker as a failed call
        would be: a worker error event, a broken connection or unreadable line, and a stream still
        running at the request's deadline (the same end-to-end budget as an unstreamed request).
        """
        served = self._served
        wid = served.worker_id
        try:
            async with asyncio.timeout_at(self.plan.deadline):  # loop time is time.monotonic()
                async for event in served.events:
                    if event.delta is not None:
                        yield event.delta
                    elif event.final is not None:
                        self._finish(event.final)
                        return
                    elif event.error is not None:
                        self._service.dispatcher.failed_midway(wid, "stream_error")
                        raise WorkerError(
                            f"worker {wid} failed midway: {event.error.message}",
                            worker=wid,
                            worker_code=event.error.code,
                        )
            raise WorkerError(f"worker {wid} ended the stream without an answer", worker=wid)
        except (TimeoutError, AttemptTimedOut):
            self._service.dispatcher.failed_midway(wid, "timeout")
            error: MoleError = WorkerTimeout(
                f"worker {wid} did not finish the stream within the request's budget",
                worker=wid,
                adapter=self.adapter,
            )
        except AttemptFailed as exc:
            self._service.dispatcher.failed_midway(wid, exc.reason.value, down=exc.reason.unreachable)
            error = WorkerError(f"worker {wid} failed midway: {exc.reason.value}", worker=wid)
        except MoleError as exc:
            error = exc
        self._service.stats.failed(error.code, error.status, self.plan.request_id, ms_since(self._t0))
        raise error

    def _finish(self, answer: InferResponse) -> None:
        served = self._served
        response = self.plan.response(
            served.worker_id,
            answer,
            path=served.path,
            degraded=served.degraded,
            timings_ms={
                "route": self.plan.route_ms,
                "dispatch": served.dispatch_ms,
                "worker": float(answer.timings_ms.get("total", served.worker_ms)),
                "total": ms_since(self._t0),
            },
        )
        self._service.stats.served(response)
        self.classified = Classified(response, self.router_version, answer.tokens_generated)


@dataclass
class Classified:
    """One answered classify request plus what the OpenAI and header layers need."""

    response: ClassifyResponse
    router_version: str
    tokens_generated: int
