"""Request limits from settings that both services enforce on top of the wire schemas."""

from __future__ import annotations

from shared.errors import InvalidInput, PayloadTooLarge
from shared.settings import Settings


def check_text_limits(
    settings: Settings, prompt: str, max_new_tokens: int | None, *, cap: int | None = None
) -> None:
    """413 for a prompt over ``max_prompt_chars``; 400 for ``max_new_tokens`` over the cap
    (``cap``, else ``settings.max_new_tokens_cap``).

    Both errors name the field and the limit (``field``/``limit`` in the error body).
    """
    if len(prompt) > settings.max_prompt_chars:
        raise PayloadTooLarge(
            f"prompt has {len(prompt)} characters, more than the limit of {settings.max_prompt_chars}",
            field="prompt",
            limit=settings.max_prompt_chars,
        )
    limit = cap if cap is not None else settings.max_new_tokens_cap
    if max_new_tokens is not None and max_new_tokens > limit:
        raise InvalidInput(
            f"max_new_tokens={max_new_tokens} exceeds the cap of {limit}",
            field="max_new_tokens",
            limit=limit,
        )
