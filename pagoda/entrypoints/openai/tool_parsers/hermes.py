"""Hermes 2 Pro / Qwen 2.5 style: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, one
block per call, after optional content."""

from __future__ import annotations

from .base import Scan, ToolParser
from .json_text import held_back_marker, object_call, skip_whitespace
from .registry import register_tool_parser

START, END = "<tool_call>", "</tool_call>"


@register_tool_parser
class HermesToolParser(ToolParser):
    name = "hermes"
    keeps_special_tokens = True  # some models make <tool_call> a special token

    def scan(self, text: str, final: bool) -> Scan:
        first = text.find(START)
        if first == -1:
            held = 0 if final else held_back_marker(text, START)
            return Scan(content=text[:len(text) - held])
        scan = Scan(content=text[:first])
        position = first
        while position != -1:
            body_start = position + len(START)
            body_end = text.find(END, body_start)
            body = text[:body_end] if body_end != -1 else text[:len(text) - held_back_marker(text, END)]
            json_start = skip_whitespace(body, body_start)
            if json_start >= len(body) or body[json_start] != "{":
                break
            call, _ = object_call(body, json_start, ("arguments",))
            scan.calls.append(call)
            position = text.find(START, body_end) if body_end != -1 else -1
        return scan
