"""Conversations -> prompt text and token ids through the tokenizer's chat template."""

from __future__ import annotations

from pathlib import Path
from typing import Any

Conversation = list[dict[str, Any]]


def render_chat(
    tokenizer: Any, conversation: Conversation, chat_template: str | None = None, add_generation_prompt: bool = True
) -> tuple[str, list[int]]:
    """The prompt text of one conversation and its token ids."""
    text = tokenizer.apply_chat_template(
        conversation, chat_template=chat_template, add_generation_prompt=add_generation_prompt, tokenize=False
    )
    # The template already holds the special tokens (BOS etc.): don't add them twice.
    return text, tokenizer.encode(text, add_special_tokens=False)


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
