"""Usage as vLLM's server reports it: stream_options.continuous_usage_stats (usage in every chunk,
with include_usage), prompt_tokens_details.cached_tokens (--enable-prompt-tokens-details: the
prompt tokens the prefix cache served), --enable-force-include-usage's rule; wrong stream options
are a 400 naming stream_options while the server goes on."""

from __future__ import annotations

import uuid
from types import SimpleNamespace

import pytest

from pagoda.entrypoints.openai.protocol import StreamOptions
from pagoda.entrypoints.openai.serving_engine import OpenAIServing, ServerConfig
from tests.serving import MODEL, openai_error, served, stream_events, tiny_model_args

MESSAGES = [{"role": "user", "content": "hi"}]
GREEDY = {"temperature": 0, "max_tokens": 5, "ignore_eos": True}
BLOCK_SIZE = 16  # the engine's default: the prefix cache serves whole blocks


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    args = [*tiny_model_args(tmp_path_factory.mktemp("usage-model")), "--enable-prompt-tokens-details"]
    with served(args, tmp_path_factory.mktemp("usage") / "server.log") as url:
        yield url


def unique_prompt(length: int = 70) -> str:
    """A prompt no earlier request shares a block with."""
    return (uuid.uuid4().hex * 3)[:length]


@pytest.mark.parametrize("path, body", [
    ("/v1/completions", {"prompt": "hello"}),
    ("/v1/chat/completions", {"messages": MESSAGES}),
])
def test_continuous_usage_stats_put_the_running_usage_in_every_chunk(http, path, body):
    options = {"include_usage": True, "continuous_usage_stats": True}
    events = stream_events(http, path, {**body, **GREEDY, "stream_options": options})
    final = events[-1]
    assert final["choices"] == [] and final["usage"]["completion_tokens"] == 5
    running = [e["usage"] for e in events[:-1]]
    assert all(u["prompt_tokens"] == final["usage"]["prompt_tokens"] for u in running)
    counts = [u["completion_tokens"] for u in running]
    assert counts == sorted(counts) and counts[-1] == 5 and all(
        u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"] for u in running
    )
    # continuous_usage_stats needs include_usage, as in vLLM; without options, no usage at all.
    alone = stream_events(http, path, {**body, **GREEDY, "stream_options": {"continuous_usage_stats": True}})
    assert all("usage" not in e for e in alone)
    assert all("usage" not in e for e in stream_events(http, path, {**body, **GREEDY}))


def test_cached_tokens_are_the_prompt_tokens_the_prefix_cache_served(http, client):
    prompt = unique_prompt()
    first = http.post("/v1/completions", json={"prompt": prompt, **GREEDY}).json()["usage"]
    assert "prompt_tokens_details" not in first  # nothing cached: vLLM leaves the details out
    again = client.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=5)
    cached = again.usage.prompt_tokens_details.cached_tokens
    assert cached == (again.usage.prompt_tokens - 1) // BLOCK_SIZE * BLOCK_SIZE and cached >= 4 * BLOCK_SIZE

    events = stream_events(http, "/v1/completions", {
        "prompt": prompt, **GREEDY, "stream_options": {"include_usage": True, "continuous_usage_stats": True},
    })
    assert all(e["usage"]["prompt_tokens_details"]["cached_tokens"] == cached for e in events if e["choices"])
    assert events[-1]["usage"]["prompt_tokens_details"]["cached_tokens"] == cached

    messages = [{"role": "user", "content": unique_prompt()}]
    assert "prompt_tokens_details" not in http.post(
        "/v1/chat/completions", json={"messages": messages, **GREEDY}).json()["usage"]
    events = stream_events(http, "/v1/chat/completions", {
        "messages": messages, **GREEDY, "stream_options": {"include_usage": True},
    })
    assert events[-1]["usage"]["prompt_tokens_details"]["cached_tokens"] >= 4 * BLOCK_SIZE


@pytest.mark.parametrize("path, body", [
    ("/v1/completions", lambda text: {"prompt": text}),
    ("/v1/chat/completions", lambda text: {"messages": [{"role": "user", "content": text}]}),
])
def test_a_cache_salt_shares_cached_prompts_only_with_the_same_salt(http, path, body):
    """vLLM's cache_salt: another salt (or none) gets none of a salted prompt's blocks."""
    request = {**body(unique_prompt()), **GREEDY}

    def cached(**salt) -> int:
        usage = http.post(path, json={**request, **salt}).json()["usage"]
        return usage.get("prompt_tokens_details", {}).get("cached_tokens", 0)

    assert cached(cache_salt="alice") == 0
    assert cached(cache_salt="alice") >= 4 * BLOCK_SIZE
    assert cached(cache_salt="bob") == 0
    assert cached() == 0
    openai_error(http.post(path, json={**request, "cache_salt": ""}), 400, "cache_salt")


def test_cached_tokens_sum_over_a_requests_prompts(http):
    prompts = [unique_prompt(), unique_prompt()]
    http.post("/v1/completions", json={"prompt": prompts, **GREEDY})
    usage = http.post("/v1/completions", json={"prompt": prompts, **GREEDY}).json()["usage"]
    assert usage["prompt_tokens_details"]["cached_tokens"] == 2 * 4 * BLOCK_SIZE  # 70-char prompts: 4 full blocks


def test_force_include_usage_gives_usage_in_every_chunk_whatever_the_options():
    """vLLM's rule (should_include_usage); the flag's wiring is tested in test_server_endpoints.py."""
    def stream_usage(force: bool, options: StreamOptions | None) -> tuple[bool, bool]:
        config = ServerConfig([MODEL], 64, None, False, enable_force_include_usage=force)
        return OpenAIServing(SimpleNamespace(tokenizer=None), config).stream_usage(options)

    assert stream_usage(True, None) == (True, True)
    assert stream_usage(True, StreamOptions(include_usage=False)) == (True, True)
    assert stream_usage(False, None) == (False, False)
    assert stream_usage(False, StreamOptions(include_usage=True)) == (True, False)
    assert stream_usage(False, StreamOptions(continuous_usage_stats=True)) == (False, False)
    assert stream_usage(False, StreamOptions(include_usage=True, continuous_usage_stats=True)) == (True, True)


@pytest.mark.parametrize("path, body", [
    ("/v1/completions", {"prompt": "hi"}),
    ("/v1/chat/completions", {"messages": MESSAGES}),
])
@pytest.mark.parametrize("options", [
    {"include_usage": True, "continuous_usage_stats": "often"},
    {"include_usage": [1]},
    "all",
])
def test_wrong_stream_options_are_a_400_naming_them(http, path, body, options):
    response = http.post(path, json={**body, "max_tokens": 1, "stream": True, "stream_options": options})
    openai_error(response, 400, "stream_options")
    assert http.post(path, json={**body, "max_tokens": 1}).status_code == 200
