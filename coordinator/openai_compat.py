"""OpenAI-compatible wire types (``/v1/chat/completions``, ``/v1/models``) and their translation.

This is the serving layer above :class:`~coordinator.service.CoordinatorService`, as vLLM's
``serving_chat`` sits above its engine client: :func:`chat_completion` translates a chat request
into a classify request, runs it, and translates the answer back.

Requests refuse what mole cannot honour, naming it: a parameter it does not implement (unless sent
with its neutral value, as some clients do), ``n > 1``, tool messages, image URLs that are not
``data:`` URLs (never fetched). System (and developer) messages become the system prompt; earlier
user and assistant turns are rendered through the chat template; the last message is the user's
prompt; the image is the last ``image_url`` part of the user messages, shown with the last user
turn (none: a text-only request). ``model`` is ``"auto"`` (the router decides), an adapter name or
label, an adapter a worker discovered, or the base model's name when the mapping serves it.

``stream: true`` answers server-sent events (``chat.completion.chunk`` objects, then
``data: [DONE]``) with the text as the worker generates it; ``stream_options.include_usage`` adds
the usage chunk. ``usage.prompt_tokens`` is the worker's count of the prompt it ran: chat template
and image tokens included.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import AsyncIterator
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from coordinator.outcomes import Classified, ClassifyStream, Sampling
from coordinator.service import CoordinatorService
from shared.errors import InvalidInput, MoleError
from shared.schemas import (
    MAX_NEW_TOKENS_LIMIT,
    MAX_STOP_STRINGS,
    SEED_MAX,
    SEED_MIN,
    ChatTurn,
    ClassifyRequest,
    FinishReason,
)

AUTO_MODEL = "auto"  # the router picks the adapter
# Parameters mole does not implement, accepted only with the value that means "off" (clients such as
# LangChain send some of them explicitly); anything else is a 400 naming them.
NEUTRAL: dict[str, tuple[Any, ...]] = {
    "frequency_penalty": (0, 0.0),
    "presence_penalty": (0, 0.0),
    "logprobs": (False,),
    "top_logprobs": (0,),
    "logit_bias": ({},),
    "tools": ([],),
    "tool_choice": ("none",),
    "parallel_tool_calls": (False, True),
    "response_format": ({"type": "text"},),
    "store": (False,),
    "metadata": ({},),
}
IGNORED = frozenset({"user"})  # metadata about the caller, not a generation parameter


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="allow")


class ImageURL(_Lenient):
    url: str
    detail: str | None = None


class ContentPart(_Lenient):
    type: str
    text: str | None = None
    image_url: ImageURL | str | None = None  # some clients send the URL string itself


class ChatMessage(_Lenient):
    role: str
    content: str | list[ContentPart] | None = None


class StreamOptions(_Lenient):
    include_usage: bool = False


class ChatCompletionRequest(_Lenient):
    """The subset of OpenAI's chat completion request that mole honours."""

    model: str = Field(min_length=1, max_length=128)
    messages: list[ChatMessage] = Field(min_length=1, max_length=64)
    max_tokens: int | None = Field(default=None, ge=1, le=MAX_NEW_TOKENS_LIMIT)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=MAX_NEW_TOKENS_LIMIT)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    seed: int | None = Field(default=None, ge=SEED_MIN, le=SEED_MAX)
    n: int | None = Field(default=None, ge=1, le=128)
    stop: str | list[str] | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None


class ChatCompletionMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatCompletionChoice(BaseModel):
    index: int = 0
    message: ChatCompletionMessage
    finish_reason: FinishReason
    logprobs: None = None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletionResponse(BaseModel):
    """A standard ``chat.completion`` object (``model`` is the adapter that answered)."""

    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatCompletionChoice]
    usage: Usage
    system_fingerprint: str | None = None


class ChunkDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: ChunkDelta
    finish_reason: FinishReason | None = None
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    """One server-sent event of a streamed completion."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "mole"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


def _text_of(content: str | list[ContentPart] | None) -> str:
    if isinstance(content, str):
        return content
    return "\n".join(p.text for p in content or [] if p.type == "text" and p.text)


def _unsupported(req: ChatCompletionRequest) -> list[str]:
    """Parameters the request sets that mole would otherwise have to ignore."""
    extra = req.model_extra or {}
    return sorted(
        name
        for name, value in extra.items()
        if name not in IGNORED and value is not None and value not in NEUTRAL.get(name, ())
    )


def _conversation(req: ChatCompletionRequest) -> tuple[str | None, list[ChatTurn], str]:
    """(system prompt, earlier turns, the last user message's text)."""
    system: list[str] = []
    turns: list[ChatTurn] = []
    for i, message in enumerate(req.messages):
        text = _text_of(message.content)
        if message.role in ("system", "developer"):
            system.append(text)
        elif message.role == "user":
            turns.append(ChatTurn(role="user", text=text))
        elif message.role == "assistant":
            turns.append(ChatTurn(role="assistant", text=text))
        else:
            field = f"messages[{i}].role"
            raise InvalidInput(f"{field}: {message.role!r} messages are not supported", field=field)
    if not turns or turns[-1].role != "user":
        raise InvalidInput("messages: the last message must be the user's", field="messages")
    prompt = turns[-1].text.strip()
    if not prompt:
        field = f"messages[{len(req.messages) - 1}].content"
        raise InvalidInput(f"{field}: the last user message needs a text part", field=field)
    return ("\n\n".join(system) if system else None), turns[:-1], prompt


def _last_image(messages: list[ChatMessage]) -> str | None:
    for i in range(len(messages) - 1, -1, -1):
        content = messages[i].content
        if messages[i].role != "user" or not isinstance(content, list):
            continue
        for j in range(len(content) - 1, -1, -1):
            part = content[j]
            if part.type != "image_url":
                continue
            field = f"messages[{i}].content[{j}].image_url.url"
            url = part.image_url.url if isinstance(part.image_url, ImageURL) else part.image_url
            if url is None:
                raise InvalidInput(f"{field} is required for an image_url part", field=field)
            if not url.lstrip()[:5].lower().startswith("data:"):
                raise InvalidInput(
                    f"{field}: only data:image/...;base64, URLs are accepted; URLs are never fetched",
                    field=field,
                )
            return url
    return None


def to_classify(req: ChatCompletionRequest) -> tuple[ClassifyRequest, Sampling]:
    """The ``/classify`` request and sampling options equivalent to a chat completion request."""
    unsupported = _unsupported(req)
    if unsupported:
        raise InvalidInput(
            f"unsupported parameters: {', '.join(unsupported)}; mole does not implement them",
            field=unsupported[0],
            unsupported=unsupported,
        )
    if req.n not in (None, 1):
        raise InvalidInput("n: only one choice (n=1) is supported", field="n")
    system, history, prompt = _conversation(req)
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stop) > MAX_STOP_STRINGS:
        raise InvalidInput(f"stop: at most {MAX_STOP_STRINGS} stop strings", field="stop")
    try:
        classify = ClassifyRequest(
            image_b64=_last_image(req.messages),
            prompt=prompt,
            expert=None if req.model == AUTO_MODEL else req.model,
            max_new_tokens=req.max_completion_tokens or req.max_tokens,
            system_prompt=system,
            stop=stop,
        )
    except ValidationError as exc:
        fields = ", ".join(".".join(str(p) for p in e["loc"]) + f": {e['msg']}" for e in exc.errors())
        raise InvalidInput(f"invalid chat completion request: {fields}") from None
    sampling = Sampling(temperature=req.temperature, top_p=req.top_p, seed=req.seed, history=tuple(history))
    return classify, sampling


def completion(served: Classified, request_id: str) -> ChatCompletionResponse:
    """The ``chat.completion`` object for one served request."""
    r = served.response
    return ChatCompletionResponse(
        id=f"chatcmpl-{request_id}",
        created=int(time.time()),
        model=r.adapter,
        choices=[
            ChatCompletionChoice(
                message=ChatCompletionMessage(content=r.output), finish_reason=r.finish_reason
            )
        ],
        usage=_usage(served),
        system_fingerprint=served.router_version[:16] or None,
    )


def _usage(served: Classified) -> Usage:
    r = served.response
    return Usage(
        prompt_tokens=r.prompt_tokens,
        completion_tokens=r.completion_tokens,
        total_tokens=r.prompt_tokens + r.completion_tokens,
    )


async def chat_completion(
    service: CoordinatorService, req: ChatCompletionRequest, request_id: str
) -> tuple[ChatCompletionResponse, Classified]:
    """Serve one chat completion through :meth:`CoordinatorService.classify`."""
    classify, sampling = to_classify(req)
    served = await service.classify(classify, request_id, sampling=sampling)
    return completion(served, request_id), served


@contextlib.asynccontextmanager
async def chat_completion_stream(
    service: CoordinatorService, req: ChatCompletionRequest, request_id: str
) -> AsyncIterator[tuple[ClassifyStream, AsyncIterator[bytes]]]:
    """Serve one streamed chat completion: entering routes the request and waits for the first
    token (errors until then are raised, for an ordinary error answer); then the server-sent
    events. Leaving the block stops the request and frees its worker slot."""
    classify, sampling = to_classify(req)
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    async with service.classify_stream(classify, request_id, sampling=sampling) as stream:
        yield stream, _sse(stream, request_id, include_usage)


async def _sse(stream: ClassifyStream, request_id: str, include_usage: bool) -> AsyncIterator[bytes]:
    created = int(time.time())
    fingerprint = stream.router_version[:16] or None

    def event(choices: list[ChunkChoice], usage: Usage | None = None) -> bytes:
        chunk = ChatCompletionChunk(
            id=f"chatcmpl-{request_id}",
            created=created,
            model=stream.adapter,
            choices=choices,
            usage=usage,
            system_fingerprint=fingerprint,
        )
        return b"data: " + chunk.model_dump_json(exclude_none=True).encode() + b"\n\n"

    yield event([ChunkChoice(delta=ChunkDelta(role="assistant", content=""))])
    try:
        async for piece in stream.deltas():
            yield event([ChunkChoice(delta=ChunkDelta(content=piece))])
    except MoleError as exc:  # after the first token the status is sent: the error is an event
        yield b"data: " + json.dumps(exc.to_body()).encode() + b"\n\n"
    else:
        served = stream.classified
        assert served is not None, "deltas() ends with the final answer"
        yield event([ChunkChoice(delta=ChunkDelta(), finish_reason=served.response.finish_reason)])
        if include_usage:
            yield event([], usage=_usage(served))
    yield b"data: [DONE]\n\n"


def model_list(adapters: list[str], created: int) -> ModelList:
    """``/v1/models``: ``auto`` first, then every served name (``created``: when serving began)."""
    cards = [ModelCard(id=name, created=created) for name in [AUTO_MODEL, *adapters]]
    return ModelList(data=cards)
