"""`pagoda serve`'s start: the port is bound first, before the server's imports and the model's
load (a port in use fails at once, not after the load), and while the engine starts every request on it gets a 503 (`/health` an
empty one, the rest an OpenAI-style error) from a small threaded responder, which hands the
listening socket to uvicorn once the app is ready. Each phase's seconds are logged."""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import ssl
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from pagoda.process_time import seconds_since_process_start

logger = logging.getLogger("pagoda.server")

# uvicorn's default backlog: connections made while the engine starts wait here, not refused.
_BACKLOG = 2048
_STARTING_MESSAGE = "the server is starting: the engine is not ready yet; retry when GET /health answers 200"


def bind_listener(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (SO_REUSEADDR, as uvicorn's); RuntimeError naming the
    address and the flag to change when it cannot be had."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family, backlog=_BACKLOG)
    except OSError as error:
        hint = " (another server is listening there: stop it, or choose another --port)" \
            if error.errno == errno.EADDRINUSE else ""
        # A name that does not resolve is a gaierror, whose errno is getaddrinfo's own code.
        reason = error.strerror or str(error)
        raise RuntimeError(f"cannot listen on {host}:{port}: {reason}{hint}") from None


def bind_unix_listener(path: str) -> socket.socket:
    """A listening Unix domain socket at `path` (vLLM's --uds), replacing a stale socket file
    there as uvicorn does; RuntimeError naming the path when it cannot be had."""
    try:
        if os.path.exists(path) and not os.path.isdir(path):
            os.remove(path)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(path)
        listener.listen(_BACKLOG)
        return listener
    except OSError as error:
        raise RuntimeError(f"cannot listen on the Unix socket {path} (--uds): {error.strerror or error}") from None


class _StartingHandler(BaseHTTPRequestHandler):
    """503 to everything: an empty one to /health (what probes read), an OpenAI-style error to
    the rest. HTTP/1.0: each connection closes after its answer, so none is reused once uvicorn
    serves the socket."""

    def _answer(self) -> None:
        if self.command not in ("GET", "HEAD", "OPTIONS"):  # read the body off, or the client sees a reset
            length = int(self.headers.get("Content-Length") or 0)
            self.rfile.read(min(length, 1 << 24))
        health = self.path.split("?", 1)[0].rstrip("/").endswith("/health")
        body = b"" if health else json.dumps({"error": {
            "message": _STARTING_MESSAGE, "type": "ServiceUnavailableError", "param": None, "code": 503,
        }}).encode()
        self.send_response(503)
        self.send_header("Retry-After", "1")
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = _answer

    def log_message(self, format: str, *args: object) -> None:
        pass  # probes poll: a line each would flood the start-up log


class _StartingServer(ThreadingHTTPServer):
    tls: ssl.SSLContext | None = None  # set with --ssl-certfile: the 503s are answered over TLS too

    def get_request(self) -> tuple[socket.socket, object]:
        connection, address = self.socket.accept()
        if self.tls is None:
            return connection, address
        # The handshake happens in the connection's own thread (on its first read), not here.
        return self.tls.wrap_socket(connection, server_side=True, do_handshake_on_connect=False), address

    def handle_error(self, request: object, client_address: object) -> None:
        # A probe that timed out and hung up before its 503 is routine while the engine starts:
        # no traceback for it. Anything else is still printed.
        if isinstance(sys.exc_info()[1], ConnectionError):
            return
        super().handle_error(request, client_address)


class StartingResponder:
    """Answers 503 on a listening socket from a thread, until `hand_over`; over TLS with `tls`."""

    def __init__(self, listener: socket.socket, tls: ssl.SSLContext | None = None) -> None:
        self.listener = listener
        self._server = _StartingServer(("", 0), _StartingHandler, bind_and_activate=False)
        self._server.socket.close()  # the one it made unbound: it serves `listener` instead
        self._server.socket = listener
        self._server.tls = tls
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="pagoda-starting", daemon=True)
        self._thread.start()

    def hand_over(self) -> socket.socket:
        """Stop answering; the socket, still listening (what arrives meanwhile waits in its backlog)."""
        self._server.shutdown()
        self._thread.join()
        return self.listener


class StartupClock:
    """Seconds per phase of the server's start, logged as each ends and summed at the end."""

    def __init__(self) -> None:
        self.phases: list[tuple[str, float]] = []
        imports = seconds_since_process_start()
        if imports is not None:
            self.phases.append(("imports", imports))
            logger.info("start-up: imports took %.1f s", imports)
        self._last = time.perf_counter()

    def lap(self, phase: str, detail: str = "") -> None:
        now = time.perf_counter()
        self.phases.append((phase, now - self._last))
        self._last = now
        logger.info("start-up: %s took %.1f s%s", phase, self.phases[-1][1], detail)

    def summary(self) -> str:
        total = sum(seconds for _, seconds in self.phases)
        return f"ready in {total:.1f} s (" + ", ".join(f"{name} {s:.1f} s" for name, s in self.phases) + ")"
