"""vLLM's --enable-request-id-headers: every response carries an X-Request-Id header, the one the
request came with (a proxy's or a client's, for tracing a request across logs) or a new one."""

from __future__ import annotations

import uuid
from typing import Any, Callable


class RequestIdHeaders:
    """Plain ASGI (no buffering): the header goes into the response's start message, streams' too."""

    def __init__(self, app: Callable) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = dict(scope["headers"]).get(b"x-request-id") or uuid.uuid4().hex.encode()

        async def send_with_id(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id)]
            await send(message)

        await self.app(scope, receive, send_with_id)
