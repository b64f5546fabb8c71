"""vLLM's serve flags for the app and its chat replies, through `pagoda serve`: --disable-fastapi-docs,
--response-role, --max-log-len, --middleware and --chat-template-content-format (and how "auto"
reads a chat template), each beside a server started without it."""

from __future__ import annotations

import re
import subprocess
import sys

import httpx
import pytest

from pagoda.entrypoints.chat_utils import detect_content_format
from pagoda.entrypoints.openai.server import import_middleware
from tests.serving import (
    CHAT_TEMPLATE, MODEL, PARTS_TEMPLATE, http_client, openai_error, python_path, serving, sse_events, tiny_model_args,
)

TWO_PARTS = [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]

MIDDLEWARE = '''
from starlette.middleware.base import BaseHTTPMiddleware


class Stamp(BaseHTTPMiddleware):
    async def dispatch(self, request, call_next):
        response = await call_next(request)
        response.headers["x-stamp-class"] = "yes"
        return response


async def stamp(request, call_next):
    response = await call_next(request)
    response.headers["x-stamp-function"] = "yes"
    return response


NOT_MIDDLEWARE = 3
'''


@pytest.fixture(scope="module")
def model_args(tmp_path_factory) -> list[str]:
    return tiny_model_args(tmp_path_factory.mktemp("flags-model"))


@pytest.fixture(scope="module")
def middleware_path(tmp_path_factory) -> str:
    """A folder holding the module stamp_middleware, for PYTHONPATH."""
    directory = tmp_path_factory.mktemp("middleware")
    (directory / "stamp_middleware.py").write_text(MIDDLEWARE)
    return str(directory)


@pytest.fixture(scope="module")
def flagged(model_args, middleware_path, tmp_path_factory):
    """A server with the flags: (client, its log file)."""
    log = tmp_path_factory.mktemp("flagged") / "server.log"
    flags = [
        "--disable-fastapi-docs", "--response-role", "bot", "--max-log-len", "5", "--log-level", "debug",
        "--middleware", "stamp_middleware.Stamp", "--middleware", "stamp_middleware.stamp",
        "--chat-template", PARTS_TEMPLATE, "--chat-template-content-format", "string",
    ]
    with serving(model_args + flags, log, python_path(middleware_path)) as (_, base):
        with http_client(base) as client:
            yield client, log


@pytest.fixture(scope="module")
def plain(model_args, tmp_path_factory):
    """A server without them (but a request may bring its own chat template): (client, its log file)."""
    log = tmp_path_factory.mktemp("plain") / "server.log"
    with serving(model_args + ["--log-level", "debug", "--trust-request-chat-template"], log) as (_, base):
        with http_client(base) as client:
            yield client, log


# --disable-fastapi-docs ------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/docs", "/redoc", "/openapi.json"])
def test_fastapi_docs_are_served_unless_disabled(flagged, plain, path):
    assert plain[0].get(path).status_code == 200
    assert flagged[0].get(path).status_code == 404


# --response-role -------------------------------------------------------------------------------


def reply_roles(http: httpx.Client, **body) -> tuple[str, str]:
    """The role of the whole reply and of the first streamed delta."""
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **body}
    whole = http.post("/v1/chat/completions", json=body)
    assert whole.status_code == 200, whole.text
    with http.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as response:
        first = sse_events(response)[0]
    return whole.json()["choices"][0]["message"]["role"], first["choices"][0]["delta"]["role"]


def test_response_role_names_the_reply_to_a_generation_prompt(flagged, plain):
    assert reply_roles(flagged[0]) == ("bot", "bot")
    assert reply_roles(plain[0]) == ("assistant", "assistant")
    # As vLLM's: without a generation prompt the reply goes on with the last message, in its role.
    assert reply_roles(flagged[0], add_generation_prompt=False) == ("user", "user")


# --max-log-len ---------------------------------------------------------------------------------


def logged_prompt(http: httpx.Client, log) -> tuple[str, list[str]]:
    """The prompt text and token ids the request log shows for a completion of "hello world"."""
    response = http.post("/v1/completions", json={"model": MODEL, "prompt": "hello world", "max_tokens": 1})
    request_id = response.json()["id"]
    found = re.search(rf"Request {request_id}-0 details: prompt: '([^']*)', prompt_token_ids: \[([^\]]*)\]",
                      log.read_text())
    assert found, log.read_text()[-3000:]
    return found.group(1), found.group(2).split(", ")


def test_max_log_len_cuts_the_logged_prompt(flagged, plain):
    text, ids = logged_prompt(*plain)
    assert text == "hello world" and len(ids) == len(text)  # whole by default (a token a byte)
    assert logged_prompt(*flagged) == ("hello", ids[:5])


# --middleware ----------------------------------------------------------------------------------


def test_middleware_classes_and_functions_wrap_every_response(flagged, plain):
    for response in (flagged[0].get("/health"), flagged[0].get("/v1/models")):
        assert response.headers["x-stamp-class"] == "yes" and response.headers["x-stamp-function"] == "yes"
    assert "x-stamp-class" not in plain[0].get("/health").headers


@pytest.mark.parametrize("path, message", [
    ("stamp_middleware.Missing", "cannot import it"),
    ("no_such_module.Stamp", "cannot import it: No module named 'no_such_module'"),
    ("stamp_middleware.NOT_MIDDLEWARE", "it is a int, not a class or a coroutine function"),
    ("Stamp", "give the import path"),
])
def test_a_bad_middleware_is_refused_naming_the_flag(middleware_path, monkeypatch, path, message):
    monkeypatch.syspath_prepend(middleware_path)
    with pytest.raises(ValueError, match=re.escape(f"--middleware {path}: {message}")):
        import_middleware(["stamp_middleware.Stamp", path])


def test_serve_refuses_a_bad_middleware_before_loading_the_model():
    # A model that does not exist: loading it would fail, so the refusal comes before.
    args = ["missing-model", "--middleware", "no_such_module.Stamp", "--device", "cpu", "--host", "127.0.0.1",
            "--port", "0"]
    run = subprocess.run([sys.executable, "-m", "pagoda.entrypoints.cli", "serve", *args],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert "error: --middleware no_such_module.Stamp: cannot import it" in run.stderr, run.stderr


# --chat-template-content-format ----------------------------------------------------------------


def rendered(http: httpx.Client, messages: list[dict], **body) -> str:
    """The prompt text of a chat request's messages."""
    body = {"model": MODEL, "messages": messages, "max_tokens": 1, "return_token_ids": True, **body}
    response = http.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    ids = response.json()["prompt_token_ids"]
    return http.post("/detokenize", json={"model": MODEL, "tokens": ids}).json()["prompt"]


def test_content_reaches_the_template_as_parts_or_a_string(flagged, plain):
    # "auto": a template that loops over content gets parts; a string content is one part.
    assert rendered(plain[0], TWO_PARTS, chat_template=PARTS_TEMPLATE) == "<user>a|b|"
    assert rendered(plain[0], [{"role": "user", "content": "hi"}], chat_template=PARTS_TEMPLATE) == "<user>hi|"
    # ...and one that writes content out gets the text parts joined by newlines, as vLLM joins them.
    assert rendered(plain[0], TWO_PARTS, add_generation_prompt=False) == "<|im_start|>user\na\nb<|im_end|>\n"
    # "string" forced: the looping template iterates over the string's 3 characters, which have no text.
    assert rendered(flagged[0], TWO_PARTS) == "<user>|||"


@pytest.mark.parametrize("template, expected", [
    (PARTS_TEMPLATE, "openai"),
    (CHAT_TEMPLATE, "string"),
    # Qwen2-VL's shape: a string written out, else the parts looped over.
    ("{% for message in messages %}{% if message['content'] is string %}{{ message['content'] }}{% else %}"
     "{% for content in message['content'] %}{% if content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
     "{% endfor %}{% endif %}{% endfor %}", "openai"),
    # The messages through a variable, the content through a filter and as an attribute.
    ("{% set loop_messages = messages[1:] %}{% for m in loop_messages | rejectattr('role', 'equalto', 'tool') %}"
     "{% for p in m.content | selectattr('type', 'equalto', 'text') %}{{ p.text }}{% endfor %}{% endfor %}", "openai"),
    # A loop over something else's content is not over a message's.
    ("{% for d in documents %}{% for c in d.content %}{{ c }}{% endfor %}{% endfor %}"
     "{% for m in messages %}{{ m.content }}{% endfor %}", "string"),
    ("{% for m in messages %}{{ m.content ", "string"),  # not a template: rendering says so
])
def test_auto_reads_the_template_syntax(template, expected):
    assert detect_content_format(template) == expected


# A request's chat_template and chat_template_kwargs on /tokenize (vLLM's, as on chat) ------------

KWARGS_TEMPLATE = "{% for m in messages %}[{{ greeting }} {{ m['content'] }}]{% endfor %}"


def tokenized(http: httpx.Client, messages: list[dict], **body) -> str:
    """The text of /tokenize's tokens for a conversation."""
    response = http.post("/tokenize", json={"model": MODEL, "messages": messages, **body})
    assert response.status_code == 200, response.text
    return http.post("/detokenize", json={"model": MODEL, "tokens": response.json()["tokens"]}).json()["prompt"]


def test_tokenize_renders_the_requests_chat_template_and_kwargs(plain):
    http = plain[0]
    hi = [{"role": "user", "content": "hi"}]
    body = {"chat_template": KWARGS_TEMPLATE, "chat_template_kwargs": {"greeting": "hey"}}
    assert tokenized(http, hi, **body) == "[hey hi]"
    assert tokenized(http, hi, **body) == rendered(http, hi, **body)  # the chat route's rendering
    parts = {"chat_template": PARTS_TEMPLATE}
    assert tokenized(http, TWO_PARTS, **parts) == rendered(http, TWO_PARTS, **parts) == "<user>a|b|"
    # Without them, the model's own template.
    assert tokenized(http, hi) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_tokenize_continues_the_final_message_as_the_chat_route_does(plain):
    http = plain[0]
    started = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Sure, the"}]
    body = {"continue_final_message": True, "add_generation_prompt": False}
    text = tokenized(http, started, **body)
    assert text == rendered(http, started, **body)
    assert text.endswith("<|im_start|>assistant\nSure, the")  # left open: no end of turn, no new turn
    both = {"continue_final_message": True, "add_generation_prompt": True}
    openai_error(http.post("/tokenize", json={"model": MODEL, "messages": started, **both}), 400, "continue_final_message")


@pytest.mark.parametrize("body, param", [
    ({"chat_template": "{% for m in messages %}{{ m.content "}, "chat_template"),  # no template
    ({"chat_template": "{{ 1 // 0 }}"}, "chat_template"),  # one that fails as it runs
    ({"chat_template": "{{ raise_exception('no') }}"}, "chat_template"),
    ({"chat_template": 5}, "chat_template"),
    ({"chat_template_kwargs": {"tokenize": True}}, "chat_template_kwargs"),  # the renderer's own argument
    ({"chat_template_kwargs": "greeting"}, "chat_template_kwargs"),
])
@pytest.mark.parametrize("route", ["/tokenize", "/v1/chat/completions"])
def test_a_bad_request_chat_template_is_a_400_naming_it(plain, route, body, param):
    http = plain[0]
    messages = [{"role": "user", "content": "hi"}]
    openai_error(http.post(route, json={"model": MODEL, "messages": messages, "max_tokens": 1, **body}), 400, param)
    assert tokenized(http, messages, chat_template=KWARGS_TEMPLATE) == "[ hi]"  # the server goes on
