"""`pagoda chat`: what it sends for its flags (and leaves out, for the server's generation-config
defaults), what it prints, against a stand-in OpenAI server on loopback that records requests."""

from __future__ import annotations

import http.server
import json
import subprocess
import sys
import threading
from typing import ClassVar

import pytest

REPLY = ["Bonjour", " à vous."]


class _FakeOpenAI(http.server.BaseHTTPRequestHandler):
    """/v1/models lists "served"; /v1/chat/completions records its body and streams REPLY."""

    bodies: ClassVar[list[dict]] = []

    def do_GET(self) -> None:
        self._send("application/json", json.dumps({"object": "list", "data": [{"id": "served"}]}).encode())

    def do_POST(self) -> None:
        self.bodies.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
        chunks = [{"choices": [{"index": 0, "delta": {"content": piece}}]} for piece in REPLY]
        events = "".join(f"data: {json.dumps(chunk)}\n\n" for chunk in chunks) + "data: [DONE]\n\n"
        self._send("text/event-stream", events.encode())

    def _send(self, content_type: str, body: bytes) -> None:
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:  # no access log in the test output
        pass


@pytest.fixture
def server():
    _FakeOpenAI.bodies = []
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FakeOpenAI)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/v1", _FakeOpenAI.bodies
    finally:
        httpd.shutdown()
        httpd.server_close()


def _chat(url: str, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pagoda.entrypoints.cli", "chat", "--url", url, "-q", "Hello", *flags],
        capture_output=True, text=True, timeout=60, check=False,
    )


def test_defaults_leave_sampling_to_the_server(server):
    url, bodies = server
    done = _chat(url)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "".join(REPLY) + "\n"
    assert "HTTP Request" not in done.stderr and "httpx" not in done.stderr  # no HTTP client log lines
    [body] = bodies
    assert body["model"] == "served" and body["messages"] == [{"role": "user", "content": "Hello"}]
    # A chat-sized reply, not the rest of the context; no temperature, so the model's
    # generation config (applied by the server) decides.
    assert body["max_tokens"] == 512 and "temperature" not in body and body["stream"] is True


def test_flags_reach_the_request(server):
    url, bodies = server
    done = _chat(url, "--model", "other", "--temperature", "0.3", "--max-tokens", "7", "--system-prompt", "Be brief")
    assert done.returncode == 0, done.stderr
    [body] = bodies
    assert (body["model"], body["temperature"], body["max_tokens"]) == ("other", 0.3, 7)
    assert body["messages"][0] == {"role": "system", "content": "Be brief"}
    # vLLM's name for --model still works.
    assert _chat(url, "--model-name", "again").returncode == 0 and bodies[1]["model"] == "again"


def test_interactive_conversation_keeps_the_history(server):
    url, bodies = server
    done = subprocess.run(
        [sys.executable, "-m", "pagoda.entrypoints.cli", "chat", "--url", url],
        input="first\nsecond\n", capture_output=True, text=True, timeout=60, check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "HTTP Request" not in done.stderr
    assert bodies[1]["messages"] == [
        {"role": "user", "content": "first"}, {"role": "assistant", "content": "".join(REPLY)},
        {"role": "user", "content": "second"},
    ]
