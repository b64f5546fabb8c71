"""Request bodies bounded in size and in time: an ASGI middleware that reads each body whole before
the app sees it. Past --max-request-body-size it answers 413; a body not all there within
--request-body-timeout of its headers gets 408 (uvicorn has neither bound: a client that stops
mid-body would hold its connection, and a huge one the server's memory, for good). Both answers
close the connection, whose unread rest would otherwise be parsed as the next request."""

from __future__ import annotations

import asyncio

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .serving_engine import OpenAIError


class _TooLarge(Exception):
    pass


class RequestBodyLimits:
    def __init__(self, app: ASGIApp, max_size: int, timeout: float) -> None:
        self.app, self.max_size, self.timeout = app, max_size, timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        try:
            if _declared_length(scope) > self.max_size:
                raise _TooLarge
            body = await asyncio.wait_for(self._read(receive), self.timeout)
        except _TooLarge:
            await _refuse(OpenAIError(
                f"the request body is larger than {self.max_size} bytes (--max-request-body-size)", 413
            ), scope, receive, send)
            return
        except asyncio.TimeoutError:
            await _refuse(OpenAIError(
                f"the request body did not all arrive within {self.timeout:g} s (--request-body-timeout)", 408
            ), scope, receive, send)
            return
        if body is not None:  # None: the client left mid-body, and nobody is there to answer
            await self.app(scope, _replay(body, receive), send)

    async def _read(self, receive: Receive) -> bytes | None:
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_size:  # a chunked body declares no length
                raise _TooLarge
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)


def _declared_length(scope: Scope) -> int:
    for name, value in scope["headers"]:
        if name == b"content-length" and value.isdigit():
            return int(value)
    return 0


def _replay(body: bytes, receive: Receive) -> Receive:
    """The whole body as one message, then the connection's own messages (a disconnect)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay


async def _refuse(error: OpenAIError, scope: Scope, receive: Receive, send: Send) -> None:
    response = JSONResponse(error.response().model_dump(), error.status, headers={"connection": "close"})
    await response(scope, receive, send)
