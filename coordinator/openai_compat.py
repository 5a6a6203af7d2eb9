"""OpenAI-compatible wire types (``/v1/chat/completions``, ``/v1/models``) and their translation.

This is the serving layer above :class:`~coordinator.service.CoordinatorService`, as vLLM's
``serving_chat`` sits above its engine client: :func:`chat_completion` translates a chat request
into a classify request, runs it, and translates the answer back.

Requests keep unknown fields (OpenAI clients send many optional ones we ignore) but refuse what we
cannot honour: ``stream: true``, ``n > 1``, image URLs that are not ``data:`` URLs (never fetched).
The last user message's text is the prompt; the image is the last ``image_url`` part of the user
messages; ``model`` is ``"auto"`` (the router decides) or an adapter name or label.
"""

from __future__ import annotations

import time
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from coordinator.service import Classified, CoordinatorService, Sampling
from shared.errors import InvalidInput
from shared.schemas import MAX_NEW_TOKENS_LIMIT, SEED_MAX, SEED_MIN, ClassifyRequest

AUTO_MODEL = "auto"  # the router picks the adapter


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
    stream: bool | None = None


class ChatCompletionMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatCompletionChoice(BaseModel):
    index: int = 0
    message: ChatCompletionMessage
    finish_reason: Literal["stop", "length"]
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


def _last_image(messages: list[ChatMessage]) -> str:
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
    raise InvalidInput(
        "messages: a user message needs an image_url part with a data:image/...;base64, URL",
        field="messages",
    )


def to_classify(req: ChatCompletionRequest) -> tuple[ClassifyRequest, Sampling]:
    """The ``/classify`` request and sampling options equivalent to a chat completion request."""
    if req.stream:
        raise InvalidInput("stream: streaming is not supported; send stream=false", field="stream")
    if req.n not in (None, 1):
        raise InvalidInput("n: only one choice (n=1) is supported", field="n")
    users = [i for i, m in enumerate(req.messages) if m.role == "user"]
    if not users:
        raise InvalidInput("messages: at least one user message is required", field="messages")
    prompt = _text_of(req.messages[users[-1]].content).strip()
    if not prompt:
        field = f"messages[{users[-1]}].content"
        raise InvalidInput(f"{field}: the last user message needs a text part", field=field)
    image = _last_image(req.messages)
    try:
        classify = ClassifyRequest(
            image_b64=image,
            prompt=prompt,
            expert=None if req.model == AUTO_MODEL else req.model,
            max_new_tokens=req.max_completion_tokens or req.max_tokens,
        )
    except ValidationError as exc:
        fields = ", ".join(".".join(str(p) for p in e["loc"]) + f": {e['msg']}" for e in exc.errors())
        raise InvalidInput(f"invalid chat completion request: {fields}") from None
    return classify, Sampling(temperature=req.temperature, top_p=req.top_p, seed=req.seed)


def completion(
    *,
    request_id: str,
    adapter: str,
    output: str,
    prompt_tokens: int,
    completion_tokens: int,
    max_new_tokens: int | None,
    fingerprint: str | None,
) -> ChatCompletionResponse:
    """The ``chat.completion`` object for one served request."""
    hit_limit = max_new_tokens is not None and completion_tokens >= max_new_tokens
    return ChatCompletionResponse(
        id=f"chatcmpl-{request_id}",
        created=int(time.time()),
        model=adapter,
        choices=[
            ChatCompletionChoice(
                message=ChatCompletionMessage(content=output), finish_reason="length" if hit_limit else "stop"
            )
        ],
        usage=Usage(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
        ),
        system_fingerprint=fingerprint,
    )


async def chat_completion(
    service: CoordinatorService, req: ChatCompletionRequest, request_id: str
) -> tuple[ChatCompletionResponse, Classified]:
    """Serve one chat completion through :meth:`CoordinatorService.classify`."""
    classify, sampling = to_classify(req)
    served = await service.classify(classify, request_id, sampling=sampling)
    body = completion(
        request_id=request_id,
        adapter=served.response.adapter,
        output=served.response.output,
        prompt_tokens=await service.count_prompt_tokens(classify.prompt),
        completion_tokens=served.tokens_generated,
        max_new_tokens=classify.max_new_tokens,
        fingerprint=served.router_version[:16] or None,
    )
    return body, served


def model_list(adapters: list[str]) -> ModelList:
    """``/v1/models``: ``auto`` first, then every adapter."""
    return ModelList(data=[ModelCard(id=AUTO_MODEL), *(ModelCard(id=name) for name in adapters)])
