"""Conversations -> prompt text and token ids through the tokenizer's chat template."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerBase

Conversation = list[dict[str, Any]]


# The rendered template already holds the special tokens (BOS etc.): encode it without adding them twice.
ADD_SPECIAL_TOKENS_TO_RENDERED = False


# Names a request's chat_template_kwargs may not set: apply_chat_template's own parameters, and the
# conversation the template sees as `messages`.
RESERVED_TEMPLATE_KWARGS = frozenset(
    name for name, parameter in inspect.signature(PreTrainedTokenizerBase.apply_chat_template).parameters.items()
    if parameter.kind is not inspect.Parameter.VAR_KEYWORD
) | {"messages", "self"}


def check_template_kwargs(template_kwargs: dict[str, Any] | None) -> None:
    """ValueError when a request's extra template variables would set the renderer's own arguments."""
    clashes = sorted(RESERVED_TEMPLATE_KWARGS.intersection(template_kwargs or {}))
    if clashes:
        raise ValueError(f"chat_template_kwargs may not set {clashes}: they are the renderer's own arguments")


def render_chat_text(
    tokenizer: Any, conversation: Conversation, chat_template: str | None = None, add_generation_prompt: bool = True,
    continue_final_message: bool = False, template_kwargs: dict[str, Any] | None = None,
    tools: list[dict[str, Any]] | None = None, documents: list[dict[str, str]] | None = None,
) -> str:
    """The prompt text of one conversation. continue_final_message leaves the last message open,
    for the model to go on with it; template_kwargs are extra variables for the template
    (such as enable_thinking); tools: the functions the model may call (OpenAI's `tools`
    entries), which the template writes into the prompt; documents: what a retrieval-augmented
    template grounds the reply in (each a dict such as {"title", "text"})."""
    return tokenizer.apply_chat_template(
        conversation, chat_template=chat_template, add_generation_prompt=add_generation_prompt,
        continue_final_message=continue_final_message, tokenize=False, tools=tools, documents=documents,
        **(template_kwargs or {}),
    )


def render_chat(
    tokenizer: Any, conversation: Conversation, chat_template: str | None = None, add_generation_prompt: bool = True,
    tools: list[dict[str, Any]] | None = None, continue_final_message: bool = False,
    template_kwargs: dict[str, Any] | None = None,
) -> tuple[str, list[int]]:
    """The prompt text of one conversation and its token ids (render_chat_text's arguments)."""
    text = render_chat_text(
        tokenizer, conversation, chat_template, add_generation_prompt, continue_final_message, template_kwargs, tools
    )
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
