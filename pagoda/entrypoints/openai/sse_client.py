"""Reading a server-sent-event stream of OpenAI chunks, for Pagoda's own clients (chat, bench).

Lines are split where SSE ends them (CRLF, LF or CR) and nowhere else, on the bytes: httpx's
iter_lines also splits at U+0085, U+2028 and U+2029, which JSON leaves unescaped inside strings,
so a model that writes one of them would cut its chunk in two."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator
from typing import Any

import httpx

_LINE_END = re.compile(rb"\r\n|\r|\n")


class _LineSplitter:
    """Whole lines out of chunks of a byte stream (a line's end may come in a later chunk)."""

    def __init__(self) -> None:
        self._pending = b""

    def feed(self, chunk: bytes) -> list[bytes]:
        data = self._pending + chunk
        cut = len(data) - 1 if data.endswith(b"\r") else len(data)  # a CR may be half of a CRLF
        lines = _LINE_END.split(data[:cut])
        self._pending = lines.pop() + data[cut:]
        return lines


def _event(line: bytes) -> dict[str, Any] | None:
    """The JSON of one `data:` line; None for blank lines, comments and the final [DONE]."""
    if not line.startswith(b"data:"):
        return None
    data = line[len(b"data:"):].strip()
    if data == b"[DONE]":
        return None
    event = json.loads(data)
    if "error" in event:
        raise RuntimeError(f"the server ended the stream: {event['error'].get('message')}")
    return event


def _events(lines: _LineSplitter, chunk: bytes) -> Iterator[dict[str, Any]]:
    """The events that a chunk completes."""
    for line in lines.feed(chunk):
        event = _event(line)
        if event is not None:
            yield event


def iter_events(chunks: Iterable[bytes]) -> Iterator[dict[str, Any]]:
    """The events of a stream's bytes (`response.iter_bytes()`)."""
    lines = _LineSplitter()
    for chunk in chunks:
        yield from _events(lines, chunk)


async def aiter_events(chunks: AsyncIterable[bytes]) -> AsyncIterator[dict[str, Any]]:
    """The events of a stream's bytes as they come (httpx's `response.aiter_bytes()`, aiohttp's
    `response.content.iter_any()`)."""
    lines = _LineSplitter()
    async for chunk in chunks:
        for event in _events(lines, chunk):
            yield event


def server_error(status: int, body: str) -> RuntimeError:
    """An error response as a RuntimeError carrying the server's message (its OpenAI error body's,
    else the body as it is)."""
    try:
        message = json.loads(body)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = body
    return RuntimeError(f"{status} from the server: {message}")


def raise_for_error(response: httpx.Response) -> None:
    if not response.is_success:
        response.read()
        raise server_error(response.status_code, response.text)
