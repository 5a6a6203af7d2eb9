"""Wire schemas shared by the coordinator (client side) and the workers (route side).

Every model rejects unknown fields (``extra="forbid"``) so contract drift fails loudly. Limits here
are the hard wire limits; services apply their own smaller caps from settings on top.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Mode = Literal["merged", "dynamic"]
FinishReason = Literal["stop", "length"]  # "length": the answer was cut by its token limit

MAX_PROMPT_CHARS = 4096  # wire limit on prompt length; settings.max_prompt_chars may be smaller
MAX_IMAGE_B64_CHARS = 20_000_000  # wire limit on the encoded image; decoded bytes are capped by settings
MAX_NEW_TOKENS_LIMIT = 4096  # wire limit; workers clamp to settings.max_new_tokens_cap
MAX_BATCH_ITEMS = 64  # items in one POST /classify/batch
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1  # a sampling seed is a signed 64-bit integer (as OpenAI's)
MAX_LABEL_INDEX = 1_000_000  # an integer ``expert`` is a router label; no mapping has more
MAX_HISTORY_TURNS = 64  # earlier turns of a conversation
MAX_STOP_STRINGS = 4  # stop strings of one request (OpenAI's limit)
ADAPTER_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"  # safe as a folder name and a metric label

# Wire headers, defined once for both sides of every hop.
REQUEST_ID_HEADER = "X-Request-Id"  # accepted or minted by every service, echoed, forwarded to workers
DEADLINE_HEADER = "X-Mole-Deadline-Ms"  # remaining budget of the request, in milliseconds
NDJSON = "application/x-ndjson"  # media type of a worker's streamed answer


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# --- worker -----------------------------------------------------------------------------------


class ChatTurn(_Strict):
    """An earlier turn of a conversation, rendered through the chat template before the prompt."""

    role: Literal["system", "user", "assistant"]
    text: str = Field(max_length=MAX_PROMPT_CHARS)


Stop = list[Annotated[str, Field(min_length=1, max_length=64)]]


class InferRequest(_Strict):
    """Worker ``POST /infer`` and ``POST /infer/stream``: one generation with one adapter.

    No ``image_b64``: a text-only request. ``system_prompt`` replaces the adapter's; ``history``
    holds earlier turns; the image goes with the last user turn, ``prompt``.
    """

    image_b64: str | None = Field(default=None, max_length=MAX_IMAGE_B64_CHARS)
    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    adapter: str = Field(min_length=1, max_length=128)
    system_prompt: str | None = Field(default=None, max_length=MAX_PROMPT_CHARS)
    history: list[ChatTurn] = Field(default_factory=list, max_length=MAX_HISTORY_TURNS)
    stop: Stop = Field(default_factory=list, max_length=MAX_STOP_STRINGS)
    max_new_tokens: int | None = Field(default=None, ge=1, le=MAX_NEW_TOKENS_LIMIT)
    temperature: float | None = Field(default=None, ge=0, le=5)  # None or 0 means greedy
    top_p: float | None = Field(default=None, gt=0, le=1)
    seed: int | None = Field(default=None, ge=SEED_MIN, le=SEED_MAX)


class InferResponse(_Strict):
    """Worker ``POST /infer`` answer. ``prompt_tokens`` counts the prompt as the model saw it, image
    tokens and chat template included."""

    output: str
    adapter: str
    mode: Mode
    worker_id: str
    tokens_generated: int
    prompt_tokens: int = 0  # the prompt's tokens, its image's visual tokens included (0: not counted)
    image_tokens: int = 0  # visual tokens of the image at the worker's image budget
    finish_reason: FinishReason = "stop"
    timings_ms: dict[str, float]


class AdapterInfo(_Strict):
    """An adapter a worker holds, with the sha256 of its weights (for drift checks)."""

    name: str
    sha256: str


class WorkerReady(_Strict):
    """Worker ``GET /health/ready`` body (status 200 only when ``status == "ready"``).

    ``failed``: the model could not be loaded and never will be without a restart; ``error`` says why.
    """

    status: Literal["ready", "loading", "draining", "failed"]
    worker_id: str
    mode: str
    adapters: list[AdapterInfo]
    error: str | None = None
    instance: str | None = None  # host and pid of the answering process (one container of an app)


class WorkerInfo(_Strict):
    """Worker ``GET /info``: what it serves and its batching limits."""

    worker_id: str
    mode: str
    adapters: list[str]
    base_model: str
    device: str
    dtype: str
    max_batch_size: int
    max_wait_ms: float
    max_queue: int
    max_new_tokens_cap: int
    max_pixels: int | None = None  # image budget (None: the checkpoint's own)
    min_pixels: int | None = None
    max_image_tokens: int | None = None  # visual tokens one image costs at most (null while loading)


class LoadAdapterRequest(_Strict):
    """Ask a dynamic worker to load (or reload) adapter ``name`` from ``path``."""

    name: str = Field(pattern=ADAPTER_NAME_PATTERN)
    path: str = Field(min_length=1)


# --- coordinator ------------------------------------------------------------------------------


class ClassifyRequest(_Strict):
    """Coordinator ``POST /classify``. ``expert`` (adapter name or label) skips the router.

    Without ``image_b64`` the request is text only: it needs ``expert``, or the router's fallback
    adapter serves it (the router reads the screenshot). ``system_prompt`` replaces the adapter's.
    """

    image_b64: str | None = Field(default=None, max_length=MAX_IMAGE_B64_CHARS)
    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    expert: Annotated[str, Field(max_length=128)] | Annotated[int, Field(ge=0, le=MAX_LABEL_INDEX)] | None = (
        None
    )
    prefer_merged: bool | None = None  # None: the mapping's routing.prefer_merged
    max_new_tokens: int | None = Field(default=None, ge=1, le=MAX_NEW_TOKENS_LIMIT)
    system_prompt: str | None = Field(default=None, max_length=MAX_PROMPT_CHARS)
    stop: Stop = Field(default_factory=list, max_length=MAX_STOP_STRINGS)


class RouteCandidate(_Strict):
    """One router label with its softmax probability."""

    label: str
    adapter: str
    probability: float


class ClassifyResponse(_Strict):
    """Coordinator ``POST /classify`` answer. ``confidence`` is null when the expert was explicit."""

    request_id: str
    adapter: str
    label: str
    confidence: float | None
    routed_by: Literal["router", "explicit", "fallback"]
    worker_id: str
    mode: Mode
    output: str
    finish_reason: FinishReason = "stop"  # "length": the token limit cut the output
    prompt_tokens: int = 0  # the prompt as the worker's model saw it, image tokens included
    completion_tokens: int = 0  # generated tokens
    routing_path: list[str]
    degraded: bool = False  # served by a fallback (e.g. dynamic instead of merged)
    top_k: list[RouteCandidate] = Field(default_factory=list)
    timings_ms: dict[str, float]


class ClassifyBatchRequest(_Strict):
    """Coordinator ``POST /classify/batch``: 1..64 independent items."""

    items: list[ClassifyRequest] = Field(min_length=1, max_length=MAX_BATCH_ITEMS)


class BatchItemError(_Strict):
    """Why one batch item failed (the same code/status the single endpoint would answer)."""

    code: str
    message: str
    status: int


class ClassifyBatchItem(_Strict):
    """One batch result: ``ok`` with ``result``, or not ``ok`` with ``error``."""

    ok: bool
    result: ClassifyResponse | None = None
    error: BatchItemError | None = None

    @model_validator(mode="after")
    def _one_of(self) -> ClassifyBatchItem:
        if self.ok != (self.result is not None) or self.ok == (self.error is not None):
            raise ValueError("ok=true needs result and no error; ok=false needs error and no result")
        return self


class ClassifyBatchResponse(_Strict):
    """Coordinator ``POST /classify/batch`` answer, one item per request item, in order."""

    results: list[ClassifyBatchItem]


class InferWebRequest(_Strict):
    """``POST /infer_web``: the original single-server API (``expert`` is a label index)."""

    image_b64: str = Field(max_length=MAX_IMAGE_B64_CHARS)
    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    expert: int | None = Field(default=None, ge=0, le=MAX_LABEL_INDEX)


class InferWebResponse(_Strict):
    """``POST /infer_web`` answer."""

    task_output: str
    routed_adapter: str
    label: str
    confidence: float | None
    worker_id: str
    mode: str
    request_id: str


# --- errors (documentation of the shape produced by shared.errors) ----------------------------


class ErrorBody(BaseModel):
    """``{"code", "message", ...details}``; details vary by error, hence extra fields are allowed."""

    model_config = ConfigDict(extra="allow")

    code: str
    message: str


class ErrorResponse(_Strict):
    """Every non-2xx body of every mole service."""

    error: ErrorBody


class InferStreamEvent(_Strict):
    """One line of a worker's ``POST /infer/stream`` answer (newline-delimited JSON): a piece of
    text (``delta``), then the ``final`` answer, or an ``error`` when generation failed midway."""

    delta: str | None = None
    final: InferResponse | None = None
    error: ErrorBody | None = None


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses=`` entries documenting :class:`ErrorResponse` for the given statuses."""
    return {status: {"model": ErrorResponse} for status in statuses}
