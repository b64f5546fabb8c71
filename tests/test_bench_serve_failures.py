"""`pagoda bench serve` against a real tiny server, with requests that fail in known ways: each
failure is printed with the HTTP status and body, or the exception when there was no response, and
the summary counts them."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import struct
import threading
import time

import aiohttp
import httpx
import pytest

from pagoda.benchmarks.serve import _send
from pagoda.benchmarks.throughput import BenchRequest
from pagoda.entrypoints.cli import build_parser
from tests.serving import API_KEY, MAX_MODEL_LEN, descendants, serving, tiny_model_args

FAILURE = re.compile(r"^request (\d+) failed: (.+)$", re.MULTILINE)


@pytest.fixture(scope="module")
def model_args(tmp_path_factory):
    return tiny_model_args(tmp_path_factory.mktemp("bench-failures"))


def bench(base: str, *extra: str) -> dict:
    args = build_parser().parse_args([
        "bench", "serve", "--base-url", base, "--api-key", API_KEY, "--random-input-len", "8", *extra,
    ])
    return args.func(args)


def test_http_errors_print_status_and_body(model_args, tmp_path, capsys):
    with serving([*model_args, "--api-key", API_KEY], tmp_path / "server.log") as (_, base):
        # 8 prompt tokens + MAX_MODEL_LEN output tokens: past the context, a 400 naming the prompt (as OpenAI).
        summary = bench(base, "--num-prompts", "3", "--random-output-len", str(MAX_MODEL_LEN))
    failures = FAILURE.findall(capsys.readouterr().out)
    assert sorted(int(index) for index, _ in failures) == [0, 1, 2]
    assert summary["failed"] == 3 and summary["completed"] == 0
    for _, error in failures:
        status, body = error.split(": ", 1)
        assert status == "HTTP 400"
        assert json.loads(body)["error"]["param"] == "prompt"
    assert sum(summary["errors"].values()) == 3


def test_server_killed_mid_run_prints_each_exception(model_args, tmp_path, capsys):
    summaries = []
    with serving([*model_args, "--api-key", API_KEY], tmp_path / "server.log") as (proc, base):
        runner = threading.Thread(target=lambda: summaries.append(
            bench(base, "--num-prompts", "4", "--random-output-len", "1000")
        ))
        runner.start()
        deadline = time.monotonic() + 60
        while _generated(base) == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _generated(base) > 0  # the streams have begun
        for pid in [proc.pid, *descendants(proc.pid)]:
            os.kill(pid, signal.SIGKILL)
        runner.join(60)
    assert not runner.is_alive()
    [summary] = summaries
    failures = FAILURE.findall(capsys.readouterr().out)
    assert len(failures) == summary["failed"] == 4
    for _, error in failures:
        # Streams already answered 200 end in a broken read; any request not yet answered, in a
        # refused connection: either way the exception's type is named.
        assert re.match(r"(HTTP 200, then |no response: )[A-Za-z]+Error\(", error), error


def _generated(base: str) -> float:
    for line in httpx.get(f"{base}/metrics").text.splitlines():
        if line.startswith("pagoda:generation_tokens_total{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError("no generation_tokens_total in /metrics")


def test_a_reset_connection_is_named_by_its_cause():
    """A server that resets the connection after reading the request (as one closing an idle
    keep-alive connection just as a request arrives does): the failure says the connection was reset."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        def reset_one() -> None:
            connection, _ = listener.accept()
            request = b"-"
            while request and not request.endswith(b"}"):  # the whole request: its JSON body ends it
                request = connection.recv(65536)
            connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            connection.close()  # with linger 0: a reset, not a clean close

        threading.Thread(target=reset_one, daemon=True).start()

        async def send() -> str:
            base = f"http://127.0.0.1:{listener.getsockname()[1]}"
            async with aiohttp.ClientSession(base_url=base, timeout=aiohttp.ClientTimeout(total=10.0)) as client:
                result = await _send(client, "m", BenchRequest([1, 2, 3], 4), [1, 2, 3], True)
            assert not result.ok
            return result.error

        error = asyncio.run(send())
    assert error.startswith("no response: ") and "Connection reset by peer" in error, error
