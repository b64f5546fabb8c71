"""One request must not stall every other client: slow chat templates, huge prompts, huge and
half-sent bodies, each against a real `pagoda serve` while /health and other requests go on."""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import socket
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest

from pagoda.entrypoints.openai.preprocess import tokenize_prompt
from pagoda.entrypoints.openai.protocol import ChatCompletionRequest
from pagoda.entrypoints.openai.serving_chat import OpenAIServingChat
from pagoda.entrypoints.openai.serving_engine import OpenAIError, ServerConfig
from tests.serving import MAX_MODEL_LEN, MODEL, openai_error, serving, tiny_model_args

TEMPLATE_TIMEOUT_S = 2
BODY_TIMEOUT_S = 2
MAX_BODY = 1_000_000
# Two nested loops of 10^5: 10^10 steps, which no server finishes.
ENDLESS_TEMPLATE = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    directory = tmp_path_factory.mktemp("stalls")
    args = tiny_model_args(directory) + [
        "--trust-request-chat-template", "--chat-template-timeout", str(TEMPLATE_TIMEOUT_S),
        "--max-request-body-size", str(MAX_BODY), "--request-body-timeout", str(BODY_TIMEOUT_S),
    ]
    with serving(args, directory / "server.log") as (proc, base):
        yield proc, base


@pytest.fixture(scope="module")
def base(server) -> str:
    return server[1]


def _health_answers_while(base: str, request: concurrent.futures.Future) -> int:
    """How many /health calls were answered 200 while `request` was in flight (each given 5 s)."""
    answered = 0
    while not request.done():
        if httpx.get(f"{base}/health", timeout=5.0).status_code == 200 and not request.done():
            answered += 1
        time.sleep(0.05)
    return answered


def _in_flight(call, *args, **kwargs) -> tuple[concurrent.futures.Future, concurrent.futures.Executor]:
    pool = concurrent.futures.ThreadPoolExecutor(1)
    return pool.submit(call, *args, **kwargs), pool


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def test_request_chat_template_is_refused_without_the_flag():
    chat = OpenAIServingChat(SimpleNamespace(tokenizer=None), ServerConfig([MODEL], 64, None, False))
    request = ChatCompletionRequest(messages=MESSAGES, chat_template="{{ messages }}")
    with pytest.raises(OpenAIError) as refused:
        asyncio.run(chat.create(request))
    assert refused.value.status == 400 and refused.value.param == "chat_template"
    assert "--trust-request-chat-template" in str(refused.value)


def test_endless_trusted_template_ends_in_a_400_at_the_bound_while_health_answers(server, base):
    proc, _ = server
    body = {"messages": MESSAGES, "chat_template": ENDLESS_TEMPLATE, "max_tokens": 1}
    chat, pool = _in_flight(httpx.post, f"{base}/v1/chat/completions", json=body, timeout=60.0)
    with pool:
        assert _health_answers_while(base, chat) >= 5
        error = openai_error(chat.result(), 400, "chat_template")
    assert f"{TEMPLATE_TIMEOUT_S} s" in error["message"]
    # The template's thread was stopped: the front end idles again instead of looping on.
    before = _cpu_seconds(proc.pid)
    time.sleep(2.0)
    assert _cpu_seconds(proc.pid) - before < 0.5
    ok = httpx.post(f"{base}/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 2}, timeout=60.0)
    assert ok.status_code == 200, ok.text


@pytest.mark.parametrize("route, field, param", [
    ("/v1/completions", "prompt", "prompt"),
    ("/v1/chat/completions", "messages", "messages"),
    ("/tokenize", "prompt", "prompt"),
])
def test_prompt_far_beyond_the_context_is_refused_after_counting_a_prefix(base, route, field, param):
    text = "hello world " * 75_000  # 900 KB, 900K tokens of the byte-level tokenizer: under the body cap
    body = {field: text if field == "prompt" else [{"role": "user", "content": text}], "max_tokens": 1}
    refused, pool = _in_flight(httpx.post, f"{base}{route}", json=body, timeout=60.0)
    with pool:
        _health_answers_while(base, refused)
        error = openai_error(refused.result(), 400, param)
    assert error["code"] == "context_length_exceeded"
    assert f"maximum context length is {MAX_MODEL_LEN} tokens" in error["message"]
    assert "first" in error["message"] and "characters" in error["message"]


class _SlowTokenizer:
    """Takes its time, as a Rust tokenizer on megabytes does, without holding the GIL."""

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        time.sleep(1.0)
        return [0] * len(text)


def test_tokenization_leaves_the_event_loop_running():
    async def ticks_while_tokenizing() -> tuple[int, list[int]]:
        ticks = 0

        async def tick() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        ticker = asyncio.create_task(tick())
        tokens = await tokenize_prompt(_SlowTokenizer(), "abc", True, 16, "prompt")
        ticker.cancel()
        return ticks, tokens

    ticks, tokens = asyncio.run(ticks_while_tokenizing())
    assert tokens == [0, 0, 0] and ticks >= 10


def test_over_cap_body_gets_413(base):
    huge = {"prompt": "x" * MAX_BODY}
    openai_error(httpx.post(f"{base}/v1/completions", json=huge, timeout=30.0), 413)

    def chunks():  # chunked: no Content-Length to refuse up front
        for _ in range(MAX_BODY // 65536 + 2):
            yield b" " * 65536

    chunked = httpx.post(f"{base}/v1/completions", content=chunks(), timeout=30.0,
                         headers={"content-type": "application/json"})
    openai_error(chunked, 413)
    assert httpx.post(f"{base}/v1/completions", json={"prompt": "still here", "max_tokens": 2},
                      timeout=60.0).status_code == 200


def test_half_sent_body_is_cut_off_after_the_timeout_while_others_go_on(base):
    host, port = base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30.0) as stalled:
        stalled.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\n"
                        b"content-length: 100\r\n\r\n{\"prompt\": ")
        # Others are served while the body is missing.
        ok = httpx.post(f"{base}/v1/completions", json={"prompt": "meanwhile", "max_tokens": 2}, timeout=60.0)
        assert ok.status_code == 200, ok.text
        answer = b""
        while chunk := stalled.recv(65536):  # the server answers, then closes the connection
            answer += chunk
    head, _, payload = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408"), answer
    assert b"--request-body-timeout" in payload
