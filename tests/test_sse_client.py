"""Pagoda's SSE reader (pagoda chat, pagoda bench serve): lines end at CRLF, LF or CR only, in
whatever chunks the bytes come; a chunk whose text holds U+0085, U+2028 or U+2029 (JSON leaves
them unescaped, and httpx's iter_lines splits at them) stays one event."""

import asyncio
import json

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from pagoda.entrypoints.openai.sse_client import aiter_events, iter_events

TEXTS = ["plain", "next\u0085line", "line\u2028separator", "para\u2029graph", "\r\n in a string", "done"]


def _stream(line_end: bytes) -> bytes:
    events = [b"data: " + json.dumps({"choices": [{"text": t}]}, ensure_ascii=False).encode() for t in TEXTS]
    return b"".join(e + line_end + line_end for e in events) + b": a comment" + line_end + b"data: [DONE]" + line_end


def _texts(events) -> list[str]:
    return [e["choices"][0]["text"] for e in events]


@pytest.mark.parametrize("line_end", [b"\n", b"\r\n", b"\r"])
@pytest.mark.parametrize("chunk_size", [1, 2, 7, 1 << 20])
def test_events_survive_any_chunking_and_unicode_line_breaks(line_end, chunk_size):
    data = _stream(line_end)
    chunks = [data[i : i + chunk_size] for i in range(0, len(data), chunk_size)]
    assert _texts(iter_events(chunks)) == TEXTS


def test_a_streamed_response_is_read_the_same_way():
    """As `pagoda bench serve` reads a stream: aiohttp's chunks as they come, from a real server
    that writes the events in pieces of 7 bytes."""
    data = _stream(b"\r\n")

    async def stream(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for i in range(0, len(data), 7):
            await response.write(data[i : i + 7])
        return response

    async def read() -> list[str]:
        app = web.Application()
        app.router.add_post("/v1/completions", stream)
        async with TestServer(app) as server, aiohttp.ClientSession() as session:
            async with session.post(server.make_url("/v1/completions")) as response:
                return _texts([event async for event in aiter_events(response.content.iter_any())])

    assert asyncio.run(read()) == TEXTS


def test_an_error_event_raises_with_the_servers_message():
    data = b'data: {"choices": [{"text": "a"}]}\n\ndata: {"error": {"message": "engine died"}}\n\n'
    events = iter_events([data])
    assert next(events)["choices"][0]["text"] == "a"
    with pytest.raises(RuntimeError, match="engine died"):
        next(events)
