"""--tool-call-parser names -> parser classes; a new format is one module that registers itself
(a --tool-parser-plugin file may do so from outside Pagoda)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from .base import ToolParser

_PARSERS: dict[str, type[ToolParser]] = {}


def register_tool_parser(cls: type[ToolParser]) -> type[ToolParser]:
    """Class decorator: make `cls` available as --tool-call-parser cls.name."""
    _PARSERS[cls.name] = cls
    return cls


def tool_parser_names() -> list[str]:
    return sorted(_PARSERS)


def get_tool_parser(name: str) -> type[ToolParser]:
    if name not in _PARSERS:
        raise ValueError(f"--tool-call-parser {name!r} is not a tool call parser: choose from {tool_parser_names()}")
    return _PARSERS[name]


def import_tool_parser_plugin(path: str) -> None:
    """Run a Python file that registers parsers with register_tool_parser (vLLM's --tool-parser-plugin)."""
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"--tool-parser-plugin {path}: no such file")
    spec = importlib.util.spec_from_file_location(f"pagoda_tool_parser_plugin_{file.stem}", file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
