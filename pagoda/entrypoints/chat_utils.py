"""Conversations -> prompt text and token ids through the tokenizer's chat template.

transformers is imported where it is used, not with this module: `pagoda serve`'s argument parser
imports this module (CONTENT_FORMATS) before it can ask for the engine's configuration, and an
import of transformers there (1.4 s on the device's GPU host, transformers 5.17) would hold the ask."""

from __future__ import annotations

import functools
import inspect
import logging
from pathlib import Path
from typing import Any

import jinja2
from jinja2 import nodes

logger = logging.getLogger(__name__)

Conversation = list[dict[str, Any]]

# vLLM's chat_template_content_format: how a message's content reaches the template. "string": text
# parts joined into one string; "openai": a list of parts ({"type": "text", "text": ...}), for
# templates that loop over them; "auto": whichever the template's source shows it takes.
CONTENT_FORMATS = ("auto", "string", "openai")


# The rendered template already holds the special tokens (BOS etc.): encode it without adding them twice.
ADD_SPECIAL_TOKENS_TO_RENDERED = False


@functools.cache
def _reserved_template_kwargs() -> frozenset[str]:
    """Names a request's chat_template_kwargs may not set: apply_chat_template's own parameters, and
    the conversation the template sees as `messages`."""
    from transformers import PreTrainedTokenizerBase

    return frozenset(
        name for name, parameter in inspect.signature(PreTrainedTokenizerBase.apply_chat_template).parameters.items()
        if parameter.kind is not inspect.Parameter.VAR_KEYWORD
    ) | {"messages", "self"}


def check_template_kwargs(template_kwargs: dict[str, Any] | None) -> None:
    """ValueError when a request's extra template variables would set the renderer's own arguments."""
    clashes = sorted(_reserved_template_kwargs().intersection(template_kwargs or {}))
    if clashes:
        raise ValueError(f"chat_template_kwargs may not set {clashes}: they are the renderer's own arguments")


def render_chat_text(
    tokenizer: Any, conversation: Conversation, chat_template: str | None = None, add_generation_prompt: bool = True,
    continue_final_message: bool = False, template_kwargs: dict[str, Any] | None = None,
    tools: list[dict[str, Any]] | None = None, documents: list[dict[str, str]] | None = None,
    content_format: str = "auto", image_placeholder: str | None = None,
) -> str:
    """The prompt text of one conversation. continue_final_message leaves the last message open,
    for the model to go on with it; template_kwargs are extra variables for the template
    (such as enable_thinking); tools: the functions the model may call (OpenAI's `tools`
    entries), which the template writes into the prompt; documents: what a retrieval-augmented
    template grounds the reply in (each a dict such as {"title", "text"}); content_format: how
    message content reaches the template (CONTENT_FORMATS); image_placeholder: what a
    vision-language model's {"type": "image"} parts become in the "string" format."""
    content_format = resolve_content_format(content_format, tokenizer, chat_template, tools)
    conversation = format_content(conversation, content_format, image_placeholder)
    return tokenizer.apply_chat_template(
        conversation, chat_template=chat_template, add_generation_prompt=add_generation_prompt,
        continue_final_message=continue_final_message, tokenize=False, tools=tools, documents=documents,
        **(template_kwargs or {}),
    )


def render_chat(
    tokenizer: Any, conversation: Conversation, chat_template: str | None = None, add_generation_prompt: bool = True,
    tools: list[dict[str, Any]] | None = None, continue_final_message: bool = False,
    template_kwargs: dict[str, Any] | None = None, content_format: str = "auto", image_placeholder: str | None = None,
) -> tuple[str, list[int]]:
    """The prompt text of one conversation and its token ids (render_chat_text's arguments)."""
    text = render_chat_text(
        tokenizer, conversation, chat_template, add_generation_prompt, continue_final_message, template_kwargs, tools,
        content_format=content_format, image_placeholder=image_placeholder,
    )
    return text, tokenizer.encode(text, add_special_tokens=ADD_SPECIAL_TOKENS_TO_RENDERED)


def resolve_content_format(
    content_format: str, tokenizer: Any, chat_template: str | None, tools: list[dict[str, Any]] | None
) -> str:
    """"string" or "openai": content_format itself, or for "auto" what the template that renders
    (chat_template, else the tokenizer's for these tools) takes."""
    if content_format not in CONTENT_FORMATS:
        raise ValueError(
            f"chat_template_content_format={content_format!r} is invalid: it must be one of {list(CONTENT_FORMATS)}"
        )
    if content_format != "auto":
        return content_format
    try:
        template = tokenizer.get_chat_template(chat_template, tools)
    except ValueError:  # no template at all: rendering says so
        return "string"
    return detect_content_format(template)


@functools.lru_cache(maxsize=16)
def detect_content_format(template: str) -> str:
    """"openai" when the template loops over a message's content (as a list of parts), else
    "string"; read off the template's syntax tree, as vLLM detects it."""
    from transformers.utils.chat_template_utils import _compile_jinja_template

    try:
        # transformers' environment: its templates may use the tags its extensions add.
        tree = _compile_jinja_template(template).environment.parse(template)
    except jinja2.TemplateError:  # rendering reports it
        return "string"
    detected = "openai" if _loops_over_content(tree) else "string"
    logger.info("chat template content format: %r, detected from the template (--chat-template-content-format, "
                "or LLM.chat's chat_template_content_format, sets it)", detected)
    return detected


def _loops_over_content(tree: nodes.Template) -> bool:
    """Whether a `for` loop of the template iterates over `m.content` or `m['content']`, m being
    the variable of a loop over the messages (or over a variable set from them, as
    `{% set loop_messages = messages[1:] %}`)."""
    loops = list(tree.find_all(nodes.For))
    messages = {"messages"}
    while True:  # the variables set from the messages, from those, ...
        assigned = {
            assign.target.name for assign in tree.find_all(nodes.Assign)
            if isinstance(assign.target, nodes.Name) and _reads(assign.node, messages)
        }
        if assigned <= messages:
            break
        messages |= assigned
    message = {
        loop.target.name for loop in loops if isinstance(loop.target, nodes.Name) and _reads(loop.iter, messages)
    }
    return any(_reads(loop.iter, message, "content") for loop in loops)


def _reads(node: nodes.Node, names: set[str], key: str | None = None) -> bool:
    """Whether node is one of the variables `names` (key: its `key` item or attribute), through any
    filters, tests and slices around it."""
    while isinstance(node, (nodes.Filter, nodes.Test)) or (
        isinstance(node, nodes.Getitem) and isinstance(node.arg, nodes.Slice)
    ):
        node = node.node
    if key is not None:
        if isinstance(node, nodes.Getitem) and isinstance(node.arg, nodes.Const) and node.arg.value == key:
            node = node.node
        elif isinstance(node, nodes.Getattr) and node.attr == key:
            node = node.node
        else:
            return False
    return isinstance(node, nodes.Name) and node.name in names


def format_content(
    conversation: Conversation, content_format: str, image_placeholder: str | None = None
) -> Conversation:
    """Each message's content in content_format ("string" or "openai"): as a string, text parts
    joined by newlines, as vLLM joins them, after one image_placeholder per {"type": "image"} part
    (a list with other parts stays as it is: an image processor or a refusal deals with it); as
    "openai", a list of parts (image parts for the template to write), a string one text part."""
    return [
        {**turn, "content": _formatted(turn["content"], content_format, image_placeholder)}
        if "content" in turn else turn
        for turn in conversation
    ]


def _formatted(content: Any, content_format: str, image_placeholder: str | None) -> Any:
    if content_format == "openai":
        if content is None:
            return []
        return [{"type": "text", "text": content}] if isinstance(content, str) else content
    if content is None:
        return ""
    kinds = {"text"} if image_placeholder is None else {"text", "image"}
    if isinstance(content, list) and all(part.get("type") in kinds for part in content):
        marks = [image_placeholder for part in content if part["type"] == "image"]
        return "\n".join(marks + [part.get("text") or "" for part in content if part["type"] == "text"])
    return content


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
