"""Reading a server-sent-event stream of OpenAI chunks, for Pagoda's own clients (chat, bench)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterable, Iterator
from typing import Any

import httpx


def _event(line: str) -> dict[str, Any] | None:
    """The JSON of one `data:` line; None for blank lines, comments and the final [DONE]."""
    if not line.startswith("data:"):
        return None
    data = line[len("data:"):].strip()
    if data == "[DONE]":
        return None
    event = json.loads(data)
    if "error" in event:
        raise RuntimeError(f"the server ended the stream: {event['error'].get('message')}")
    return event


def iter_events(lines: Iterable[str]) -> Iterator[dict[str, Any]]:
    for line in lines:
        event = _event(line)
        if event is not None:
            yield event


async def aiter_events(response: httpx.Response) -> AsyncIterator[dict[str, Any]]:
    async for line in response.aiter_lines():
        event = _event(line)
        if event is not None:
            yield event


def raise_for_error(response: httpx.Response) -> None:
    """An error response as a RuntimeError carrying the server's message."""
    if response.is_success:
        return
    response.read()
    try:
        message = response.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = response.text
    raise RuntimeError(f"{response.status_code} from the server: {message}")
