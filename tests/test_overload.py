"""Serving under load: --max-queued-requests refuses new requests with 503 and Retry-After while the
queue is full, and a request whose client leaves while it waits is dropped before it is prefilled.

One server, --max-num-seqs 1: a long streamed request holds the only running slot, so the requests
after it wait for as long as the test needs."""

from __future__ import annotations

import contextlib
import json
import select
import socket
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.serving import API_KEY, MODEL, openai_error, save_tokenizer, serving
from tests.test_server import _finished, _metrics
from tests.tiny_models import save_tiny_model

MAX_QUEUED = 2
# The running request: 30,000 tokens keep the slot for longer than any test here takes.
LONG_CONTEXT = 32768
HOLD = {"model": MODEL, "prompt": "hold", "max_tokens": 30000, "ignore_eos": True, "temperature": 0,
        "stream": True}
WAIT = {"model": MODEL, "prompt": "queued", "max_tokens": 4, "temperature": 0}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    directory = tmp_path_factory.mktemp("overload")
    vocab_size = save_tokenizer(directory / "llama3")
    path = save_tiny_model("llama3", directory, vocab_size=vocab_size, max_position_embeddings=LONG_CONTEXT)
    log = directory / "server.log"
    args = [str(path), "--served-model-name", MODEL, "--max-num-seqs", "1", "--api-key", API_KEY,
            "--max-queued-requests", str(MAX_QUEUED)]
    with serving(args, log) as (_, base):
        yield base, log


@pytest.fixture()
def http(server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server[0], headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30.0) as client:
        yield client


@contextlib.contextmanager
def running(http: httpx.Client) -> Iterator[None]:
    """The long request, streaming (so the one slot is taken) until the block ends."""
    with http.stream("POST", "/v1/completions", json=HOLD) as response:
        assert response.status_code == 200
        lines = response.iter_lines()  # kept: a dropped line iterator closes the response
        assert next(line for line in lines if line.startswith("data:"))
        yield
    wait_for(http, lambda m: m["pagoda:num_requests_running"] == 0 and m["pagoda:kv_cache_usage_perc"] == 0)


def send_and_keep_open(base: str, body: dict) -> socket.socket:
    """A request sent on a raw connection whose answer is never read: closing it is the client
    leaving."""
    data = json.dumps(body).encode()
    raw = socket.create_connection(("127.0.0.1", int(base.rsplit(":", 1)[1])))
    raw.sendall(
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Authorization: Bearer {API_KEY}\r\nContent-Length: {len(data)}\r\n\r\n".encode() + data
    )
    return raw


def wait_for(http: httpx.Client, condition, timeout: float = 20.0) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = _metrics(http)
        if condition(m):
            return m
        time.sleep(0.05)
    gauges = {k: v for k, v in _metrics(http).items() if "_seconds" not in k}
    raise AssertionError(f"condition not met: {gauges}")


def waiting(count: int):
    return lambda m: m["pagoda:num_requests_waiting"] == count and m["pagoda:num_requests_running"] == 1


def test_clients_gone_while_waiting_are_never_prefilled(server, http):
    base, _ = server
    with running(http):
        before = wait_for(http, waiting(0))
        clients = [send_and_keep_open(base, {**WAIT, "stream": True}), send_and_keep_open(base, WAIT)]
        wait_for(http, waiting(2))
        for client in clients:
            client.close()
        # Dropped while the long request still runs: they never reached the batch.
        after = wait_for(http, waiting(0))
        assert _finished(after, "abort") == _finished(before, "abort") + 2
        # Admission looks a prompt up in the prefix cache; nothing was admitted since the long request.
        assert after["pagoda:prefix_cache_queries_total"] == before["pagoda:prefix_cache_queries_total"]
    # (running() then waits for the KV cache to be empty: they hold no block either; the long
    # request's own blocks grow meanwhile, so usage is not compared while it runs.)


def answered(clients: list[socket.socket], count: int, timeout: float = 10.0) -> list[bytes]:
    """The first bytes of the answers on those connections that get one, once `count` have."""
    answers: dict[socket.socket, bytes] = {}
    deadline = time.monotonic() + timeout
    while len(answers) < count and time.monotonic() < deadline:
        readable, _, _ = select.select([c for c in clients if c not in answers], [], [], 0.1)
        for client in readable:
            answers[client] = client.recv(4096)
    return list(answers.values())


def test_full_queue_answers_503_with_retry_after(server, http):
    base, _ = server
    with running(http):
        # A burst, all sent before the engine core reports again: the bound holds exactly.
        burst = [send_and_keep_open(base, WAIT) for _ in range(MAX_QUEUED + 3)]
        wait_for(http, waiting(MAX_QUEUED))
        answers = answered(burst, 3)
        assert len(answers) == 3 and all(a.startswith(b"HTTP/1.1 503") for a in answers), answers
        for body in (WAIT, {**WAIT, "stream": True}):  # a stream is refused before it starts
            response = http.post("/v1/completions", json=body)
            error = openai_error(response, 503)
            assert error["type"] == "server_error" and "queue is full" in error["message"]
            assert int(response.headers["retry-after"]) >= 1
        chat = http.post("/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": "x"}]})
        openai_error(chat, 503)
        for client in burst:
            client.close()
        wait_for(http, waiting(0))
        retry = send_and_keep_open(base, WAIT)  # room again: queued, not refused
        wait_for(http, waiting(1))
        retry.close()
    assert http.post("/v1/completions", json=WAIT).status_code == 200
