"""Llama 3.1+ JSON tool calls: the reply is `{"name": ..., "parameters": {...}}` (or
"arguments"), optionally after `<|python_tag|>`, several separated by `;`. A reply that starts
otherwise is content."""

from __future__ import annotations

from .base import Scan, ToolParser
from .json_text import object_call, skip_whitespace
from .registry import register_tool_parser

PYTHON_TAG = "<|python_tag|>"


@register_tool_parser
class Llama3JsonToolParser(ToolParser):
    name = "llama3_json"
    keeps_special_tokens = True  # <|python_tag|> is a special token

    def scan(self, text: str, final: bool) -> Scan:
        start = skip_whitespace(text, 0)
        if text.startswith(PYTHON_TAG, start):
            start = skip_whitespace(text, start + len(PYTHON_TAG))
        elif start == len(text) or not final and PYTHON_TAG.startswith(text[start:]):
            return Scan(content=text if final else "")  # only whitespace, or maybe the tag's start: undecided
        if start < len(text) and text[start] != "{":
            return Scan(content=text)
        scan = Scan(content="")
        position: int | None = start
        while position is not None and position < len(text) and text[position] == "{":
            call, end = object_call(text, position, ("parameters", "arguments"))
            scan.calls.append(call)
            position = None if end is None else _next_call(text, end)
        return scan


def _next_call(text: str, end: int) -> int | None:
    position = skip_whitespace(text, end)
    if position < len(text) and text[position] == ";":
        return skip_whitespace(text, position + 1)
    return None
