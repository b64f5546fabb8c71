"""Reading tool calls out of JSON text that may still be growing (a stream cut at any character)."""

from __future__ import annotations

import json

from .base import PartialCall

_DECODER = json.JSONDecoder()
_WHITESPACE = " \t\n\r"


def skip_whitespace(text: str, position: int) -> int:
    while position < len(text) and text[position] in _WHITESPACE:
        position += 1
    return position


def value_end(text: str, start: int) -> int | None:
    """Where the JSON value starting at `start` ends, or None while it is incomplete (or not JSON).
    A number that reaches the end of the text may still grow, so it is incomplete too."""
    try:
        _, end = _DECODER.raw_decode(text, start)
    except ValueError:
        return None
    if end == len(text) and text[end - 1] not in '}]"el':  # true, false, null end in e or l
        return None
    return end


def held_back_marker(text: str, marker: str) -> int:
    """How many characters at the end of `text` could be the start of `marker` (to hold back from
    a stream until the next text says whether the marker follows)."""
    for length in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-length:]):
            return length
    return 0


def object_call(text: str, start: int, argument_keys: tuple[str, ...]) -> tuple[PartialCall, int | None]:
    """The call written as a JSON object at text[start] ({"name": ..., "arguments": {...}}), and
    where that object ends (None while it is incomplete)."""
    fields, end = _object_fields(text, start)
    name_span = fields.get("name")
    name = None
    if name_span is not None and name_span[1] is not None:
        value = json.loads(text[name_span[0]:name_span[1]])
        name = value if isinstance(value, str) else None
    arguments = None
    key = next((k for k in argument_keys if k in fields), None)
    if key is not None:
        value_start, value_stop = fields[key]
        arguments = text[value_start:value_stop if value_stop is not None else len(text)]
    return PartialCall(name=name, arguments=arguments, complete=end is not None), end


def _object_fields(text: str, start: int) -> tuple[dict[str, tuple[int, int | None]], int | None]:
    """The top-level fields of the JSON object at text[start] as key -> (value start, value end or
    None while incomplete), and where the object ends (None while incomplete)."""
    fields: dict[str, tuple[int, int | None]] = {}
    position = skip_whitespace(text, start + 1)
    while position < len(text):
        if text[position] == "}":
            return fields, position + 1
        key_end = value_end(text, position) if text[position] == '"' else None
        if key_end is None:
            break
        key = json.loads(text[position:key_end])
        colon = skip_whitespace(text, key_end)
        if colon >= len(text) or text[colon] != ":":
            break
        value_start = skip_whitespace(text, colon + 1)
        if value_start >= len(text):
            break
        end = value_end(text, value_start)
        fields[key] = (value_start, end)
        if end is None:
            break
        position = skip_whitespace(text, end)
        if position < len(text) and text[position] == ",":
            position = skip_whitespace(text, position + 1)
    return fields, None
