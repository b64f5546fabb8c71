"""Tool-call parsers: a model's text -> OpenAI `tool_calls`, whole or streamed (--tool-call-parser)."""

from . import hermes, llama3_json, mistral  # noqa: F401  (built-in parsers register themselves)
from .base import ExtractedToolCalls, PartialCall, Scan, ToolCallStream, ToolParser
from .registry import (
    get_tool_parser,
    import_tool_parser_plugin,
    register_tool_parser,
    tool_parser_names,
)

__all__ = [
    "ExtractedToolCalls", "PartialCall", "Scan", "ToolCallStream", "ToolParser", "get_tool_parser",
    "import_tool_parser_plugin", "register_tool_parser", "tool_parser_names",
]
