"""Mistral: content, then `[TOOL_CALLS]` and either a JSON array of
{"name": ..., "arguments": {...}} (tokenizers before v11) or, per call, `name[ARGS]{...}` (v11+)."""

from __future__ import annotations

import random
import string

from .base import PartialCall, Scan, ToolParser
from .json_text import held_back_marker, object_call, skip_whitespace, value_end
from .registry import register_tool_parser

TOOL_CALLS, ARGS = "[TOOL_CALLS]", "[ARGS]"
_ID_ALPHABET = string.ascii_letters + string.digits


@register_tool_parser
class MistralToolParser(ToolParser):
    name = "mistral"
    keeps_special_tokens = True  # [TOOL_CALLS] is a control token

    def new_call_id(self) -> str:
        # Mistral's templates refuse ids that are not 9 letters or digits.
        return "".join(random.choices(_ID_ALPHABET, k=9))

    def scan(self, text: str, final: bool) -> Scan:
        first = text.find(TOOL_CALLS)
        if first == -1:
            held = 0 if final else held_back_marker(text, TOOL_CALLS)
            return Scan(content=text[:len(text) - held])
        scan = Scan(content=text[:first])
        body = skip_whitespace(text, first + len(TOOL_CALLS))
        if body < len(text) and text[body] == "[":
            scan.calls = json_array_calls(text, body, ("arguments",))
        else:
            scan.calls = _named_calls(text, first)
        return scan


def json_array_calls(text: str, start: int, argument_keys: tuple[str, ...]) -> list[PartialCall]:
    """The calls of a JSON array of call objects at text[start] (which is '[')."""
    calls: list[PartialCall] = []
    position = skip_whitespace(text, start + 1)
    while position < len(text) and text[position] == "{":
        call, end = object_call(text, position, argument_keys)
        calls.append(call)
        if end is None:
            break
        position = skip_whitespace(text, end)
        if position < len(text) and text[position] == ",":
            position = skip_whitespace(text, position + 1)
    return calls


def _named_calls(text: str, first: int) -> list[PartialCall]:
    """v11+: `[TOOL_CALLS]name[ARGS]{...}`, repeated for each call."""
    calls: list[PartialCall] = []
    for piece in text[first + len(TOOL_CALLS):].split(TOOL_CALLS):
        name, marker, arguments = piece.partition(ARGS)
        if not marker:
            break  # the name may still grow
        arguments = arguments.lstrip()
        end = value_end(arguments, 0) if arguments else None
        calls.append(PartialCall(
            name=name.strip(), arguments=arguments[:end] if end is not None else arguments, complete=end is not None,
        ))
    return calls
