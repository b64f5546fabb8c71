"""`pagoda bench serve` against other kinds of server, faked in the test (stdlib HTTP, loopback
only): llama.cpp's llama-server, detected by its /props and sent the same token-id prompts; a
clear error, not "empty range for randrange()", when a server's tokenizer answers no tokens; and a
malformed stream event is one request's recorded failure, not the end of the run."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import aiohttp
import pytest

from pagoda.benchmarks.serve import _POOL_TEXT, _send
from pagoda.benchmarks.datasets import BenchRequest
from pagoda.entrypoints.cli import build_parser, main


class FakeLlamaServer(BaseHTTPRequestHandler):
    """The routes of llama-server that the bench uses, as its README describes them: /tokenize
    reads {"content"} (anything else tokenizes nothing), /v1/completions takes token ids and
    streams one character a token; `broken` streams an event that is not JSON."""

    prompts: list = []
    bodies: list = []  # each /v1/completions request's body
    broken = False

    def _json(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        if self.path == "/props":
            self._json(200, {"default_generation_settings": {"n_ctx": 4096}, "total_slots": 4})
        elif self.path == "/v1/models":
            self._json(200, {"object": "list", "data": [{"id": "fake.gguf", "object": "model"}]})
        else:
            self._json(404, {"error": {"code": 404, "message": "File Not Found", "type": "not_found_error"}})

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.path == "/tokenize":
            self._json(200, {"tokens": [ord(c) for c in body.get("content", "")]})
        elif self.path == "/v1/completions":
            self.prompts.append(body["prompt"])
            self.bodies.append(body)
            self._stream(body["max_tokens"])
        else:
            self._json(404, {"error": {"code": 404, "message": "File Not Found", "type": "not_found_error"}})

    def _stream(self, max_tokens: int) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        events = ["{not json"] if self.broken else [
            json.dumps({"choices": [{"index": 0, "text": "x", "finish_reason": None}], "object": "text_completion"})
            for _ in range(max_tokens)
        ]
        for event in [*events, "[DONE]"]:
            self.wfile.write(f"data: {event}\n\n".encode())
            self.wfile.flush()

    def log_message(self, format: str, *args: object) -> None:
        pass


@contextlib.contextmanager
def fake_llama_server(broken: bool = False) -> Iterator[tuple[str, list]]:
    handler = type("Handler", (FakeLlamaServer,), {"prompts": [], "bodies": [], "broken": broken})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", handler
    finally:
        server.shutdown()
        server.server_close()


def bench(base: str, *extra: str) -> dict:
    args = build_parser().parse_args([
        "bench", "serve", "--base-url", base, "--num-prompts", "4", "--random-input-len", "10",
        "--random-output-len", "5", *extra,
    ])
    return args.func(args)


@pytest.mark.parametrize("backend", ["auto", "llama.cpp"])
def test_llama_server_gets_token_id_prompts(backend):
    with fake_llama_server() as (base, handler):
        summary = bench(base, "--backend", backend)
    prompts = handler.prompts
    assert summary["completed"] == 4 and summary["failed"] == 0
    assert summary["model"] == "fake.gguf"
    assert summary["total_output_tokens"] == 4 * 5  # one token a chunk: the stream has no usage
    pool = {ord(c) for c in _POOL_TEXT}
    assert len(prompts) == 4
    for prompt in prompts:
        assert len(prompt) == 10 and all(isinstance(t, int) and t in pool for t in prompt), prompt


def test_a_tokenizer_that_answers_no_tokens_is_a_clear_error(capsys):
    with fake_llama_server() as (base, handler), pytest.raises(SystemExit) as exit_info:
        # The vLLM body: llama-server reads no "content" in it and answers {"tokens": []}.
        main(["bench", "serve", "--base-url", base, "--num-prompts", "2", "--backend", "vllm"])
    assert exit_info.value.code == 2 and handler.prompts == []
    error = capsys.readouterr().err
    assert "gave no tokens" in error and "--backend" in error and "llama.cpp" in error, error
    assert "randrange" not in error


def test_a_malformed_stream_event_is_the_request_s_failure_with_its_exception():
    async def send() -> str:
        with fake_llama_server(broken=True) as (base, _):
            async with aiohttp.ClientSession(base_url=base, timeout=aiohttp.ClientTimeout(total=10.0)) as client:
                result = await _send(client, "fake.gguf", BenchRequest([1, 2, 3], 4), [1, 2, 3], True)
        assert not result.ok
        return result.error

    error = asyncio.run(send())
    assert re.match(r"HTTP 200, then JSONDecodeError\(", error), error


def test_vllms_bench_serve_flags_run_unchanged(tmp_path):
    """A `vllm bench serve` command line: --host/--port rather than a URL, --dataset-name random,
    --save-result into --result-dir, and --ignore-eos (on by default; --no-ignore-eos lets EOS end)."""
    with fake_llama_server() as (base, handler):
        port = base.rsplit(":", 1)[1]
        args = build_parser().parse_args([
            "bench", "serve", "--host", "127.0.0.1", "--port", port, "--dataset-name", "random", "--num-prompts", "2",
            "--random-input-len", "4", "--random-output-len", "3", "--save-result", "--result-dir", str(tmp_path),
            "--result-filename", "run.json", "--no-ignore-eos",
        ])
        summary = args.func(args)
    assert summary["completed"] == 2 and json.loads((tmp_path / "run.json").read_text()) == summary
    assert [body["ignore_eos"] for body in handler.bodies] == [False, False]
