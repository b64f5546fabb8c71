"""The chat playground: the page at / and /playground and its script and style, files shipped in
the package (static/) and read once when the app is built; the page talks to the server's own
OpenAI API from the browser."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import Response

_STATIC = Path(__file__).parent / "static"
# Each file the playground serves: its URL path(s), its file, its media type.
_FILES = [
    (("/", "/playground"), "index.html", "text/html; charset=utf-8"),
    (("/playground/playground.js",), "playground.js", "text/javascript; charset=utf-8"),
    (("/playground/playground.css",), "playground.css", "text/css; charset=utf-8"),
]


def add_playground_routes(app: FastAPI) -> None:
    for paths, name, media_type in _FILES:
        handler = _file_handler((_STATIC / name).read_bytes(), media_type)
        for path in paths:
            app.add_api_route(path, handler, methods=["GET"], include_in_schema=False)


def _file_handler(content: bytes, media_type: str) -> Callable[[], Awaitable[Response]]:
    async def serve() -> Response:
        return Response(content, media_type=media_type, headers={"Cache-Control": "no-cache"})

    return serve
