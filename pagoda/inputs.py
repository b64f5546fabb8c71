"""The prompt forms `LLM.generate` takes, as vLLM's `vllm.inputs` names them, so that scripts
importing them run unchanged: a text prompt or token ids, each with optional images
(multi_modal_data) and a prefix-cache salt. They are plain dicts; the engine reads their keys."""

from __future__ import annotations

from typing import Any, TypedDict, Union

# typing's own from Python 3.11; typing_extensions comes with torch and pydantic.
from typing_extensions import NotRequired


class TextPrompt(TypedDict):
    prompt: str
    multi_modal_data: NotRequired[dict[str, Any]]  # {"image": a PIL image or a list of them}
    cache_salt: NotRequired[str]


class TokensPrompt(TypedDict):
    prompt_token_ids: list[int]
    prompt: NotRequired[str]  # its text, when known: outputs carry it
    token_type_ids: NotRequired[list[int]]  # a BERT text pair's: 0 through the first text, then 1
    multi_modal_data: NotRequired[dict[str, Any]]
    cache_salt: NotRequired[str]


PromptType = Union[str, TextPrompt, TokensPrompt]
