"""Conversations -> prompt text and token ids through the tokenizer's chat template."""

from __future__ import annotations

from pathlib import Path
from typing import Any

Conversation = list[dict[str, Any]]


# The rendered template already holds the special tokens (BOS etc.): encode it without adding them twice.
ADD_SPECIAL_TOKENS_TO_RENDERED = False


def render_chat_text(
    tokenizer: Any, conversation: Conversation, chat_template: str | None = None, add_generation_prompt: bool = True,
    tools: list[dict[str, Any]] | None = None,
) -> str:
    """The prompt text of one conversation; tools: the functions the model may call (OpenAI's
    `tools` entries), which the template writes into the prompt."""
    return tokenizer.apply_chat_template(
        conversation, chat_template=chat_template, add_generation_prompt=add_generation_prompt, tokenize=False,
        tools=tools,
    )


def render_chat(
    tokenizer: Any, conversation: Conversation, chat_template: str | None = None, add_generation_prompt: bool = True,
    tools: list[dict[str, Any]] | None = None,
) -> tuple[str, list[int]]:
    """The prompt text of one conversation and its token ids."""
    text = render_chat_text(tokenizer, conversation, chat_template, add_generation_prompt, tools)
    return text, tokenizer.encode(text, add_special_tokens=ADD_SPECIAL_TOKENS_TO_RENDERED)


def load_chat_template(template: str | None) -> str | None:
    """A --chat-template value: a path to a Jinja file, or the template itself (as vLLM takes it)."""
    if template is None:
        return None
    path = Path(template)
    if len(template) < 4096 and "{" not in template:
        if not path.is_file():
            raise ValueError(f"chat template file {template!r} does not exist")
        return path.read_text()
    return template
