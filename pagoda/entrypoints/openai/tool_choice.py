"""What a chat request's `tools` and `tool_choice` ask for: checked against the server's flags,
the JSON schema that "required" and a named function constrain the output to, and the parser
that reads tool calls out of the output.

tool_choice_json_schema is the one place the constraint is built; serving_chat hands it to the
request's guided decoding, so that "required" and named calls are always valid."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from .protocol import (
    ChatCompletionRequest,
    ChatCompletionToolParam,
    NamedToolChoice,
    ToolChoice,
)
from .serving_engine import OpenAIError
from .tool_parsers import PartialCall, Scan, ToolParser
from .tool_parsers.json_text import skip_whitespace, value_end
from .tool_parsers.mistral import json_array_calls

_NO_ARGUMENTS = {"type": "object", "properties": {}}


@dataclass
class ToolCalling:
    """How one request's output becomes tool calls."""

    parser: ToolParser | None  # None: the output is all content
    json_schema: dict[str, Any] | None  # what "required" / a named function constrain the output to
    finish_reason: str | None  # that of a choice that called tools (None: the engine's own)


def tool_calling(
    request: ChatCompletionRequest, auto_parser: type[ToolParser] | None, tokenizer: Any
) -> ToolCalling:
    """The request's tool calling, or a 400 naming `tools` or `tool_choice`; auto_parser is the
    server's --tool-call-parser when --enable-auto-tool-choice is set."""
    tools, choice = request.tools or [], request.tool_choice
    if choice is None:
        choice = "auto" if tools else "none"  # OpenAI's default
    if choice != "none" and not tools:
        raise OpenAIError("When using `tool_choice`, `tools` must be set.", param="tool_choice")
    if isinstance(choice, NamedToolChoice) and choice.function.name not in {t.function.name for t in tools}:
        raise OpenAIError(f"Tool '{choice.function.name}' has not been passed in `tools`.", param="tool_choice")
    if choice == "auto" and auto_parser is None:
        raise OpenAIError(
            '"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser to be set',
            param="tool_choice",
        )
    if choice == "none":
        return ToolCalling(parser=None, json_schema=None, finish_reason=None)
    if choice == "auto":
        return ToolCalling(parser=auto_parser(tokenizer), json_schema=None, finish_reason="tool_calls")
    if choice == "required":
        return ToolCalling(parser=RequiredToolCallsParser(tokenizer), json_schema=tool_choice_json_schema(tools, choice),
                           finish_reason="tool_calls")
    # OpenAI ends a call of the function the request named with "stop".
    return ToolCalling(parser=NamedToolCallParser(tokenizer, choice.function.name),
                       json_schema=tool_choice_json_schema(tools, choice), finish_reason=None)


def tool_choice_json_schema(tools: list[ChatCompletionToolParam], tool_choice: ToolChoice) -> dict[str, Any] | None:
    """The JSON schema the output must follow (None for "none" and "auto"), as vLLM builds it: a
    named function's output is its arguments; "required"'s is an array of one or more
    {"name", "parameters"} objects, each naming a tool and holding arguments of that tool."""
    if isinstance(tool_choice, NamedToolChoice):
        tool = next(t for t in tools if t.function.name == tool_choice.function.name)
        return tool.function.parameters or dict(_NO_ARGUMENTS)
    if tool_choice != "required":
        return None
    schema: dict[str, Any] = {
        "type": "array", "minItems": 1,
        "items": {"type": "object", "anyOf": [_call_schema(tool) for tool in tools]},
    }
    defs = _shared_defs(tools)
    if defs:
        schema["$defs"] = defs
    return schema


def _call_schema(tool: ChatCompletionToolParam) -> dict[str, Any]:
    parameters = copy.deepcopy(tool.function.parameters) or dict(_NO_ARGUMENTS)
    parameters.pop("$defs", None)  # moved to the root, where "#/$defs/..." references resolve
    return {
        "properties": {"name": {"type": "string", "enum": [tool.function.name]}, "parameters": parameters},
        "required": ["name", "parameters"],
    }


def _shared_defs(tools: list[ChatCompletionToolParam]) -> dict[str, Any]:
    defs: dict[str, Any] = {}
    for tool in tools:
        for name, schema in ((tool.function.parameters or {}).get("$defs") or {}).items():
            if defs.setdefault(name, schema) != schema:
                raise OpenAIError(
                    f"Tool definition '{name}' has multiple schemas, which is not supported.", param="tools"
                )
    return defs


def template_tools(request: ChatCompletionRequest) -> list[dict[str, Any]] | None:
    """The tools as the chat template receives them (vLLM passes them even for "none")."""
    if not request.tools:
        return None
    return [tool.model_dump(exclude_none=True) for tool in request.tools]


class RequiredToolCallsParser(ToolParser):
    """The output of "required": a JSON array of {"name": ..., "parameters": {...}}."""

    name = "required"

    def scan(self, text: str, final: bool) -> Scan:
        start = _json_start(text, "[", final)
        if start is None:
            return Scan(content=text if final or text.strip() else "")
        return Scan(content="", calls=json_array_calls(text, start, ("parameters",)))


class NamedToolCallParser(ToolParser):
    """The output of a named tool_choice: the named function's arguments, as a JSON object."""

    name = "named"

    def __init__(self, tokenizer: Any, function_name: str) -> None:
        super().__init__(tokenizer)
        self.function_name = function_name

    def scan(self, text: str, final: bool) -> Scan:
        start = _json_start(text, "{", final)
        if start is None:
            return Scan(content=text if final or text.strip() else "")
        arguments = text[start:]
        complete = value_end(arguments, 0) is not None
        return Scan(content="", calls=[PartialCall(name=self.function_name, arguments=arguments, complete=complete)])


def _json_start(text: str, opening: str, final: bool) -> int | None:
    """Where the JSON output starts (None when the text is not JSON starting with `opening`, which
    only happens while generation is not constrained to the schema)."""
    start = skip_whitespace(text, 0)
    if start < len(text) and text[start] == opening or start == len(text) and not final:
        return start
    return None
