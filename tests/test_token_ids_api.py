"""Token ids in and out of `pagoda serve`, as vLLM's server has them: return_token_ids (prompt and
output ids, whole and streamed), logprob tokens as "token_id:N" (--return-tokens-as-token-ids and
the request's return_tokens_as_token_ids), allowed_token_ids, truncate_prompt_tokens, logprobs and
prompt_logprobs of -1 (the whole vocabulary) bounded by --max-logprobs, prompt_logprobs present as
null; each wrong value a 400 naming its field while the server goes on. Also the offline
SamplingParams' allowed_token_ids and truncate_prompt_tokens."""

from __future__ import annotations

from types import SimpleNamespace

import httpx
import pytest

from pagoda import LLM, SamplingParams
from pagoda.engine.input_processor import InputProcessor
from tests.serving import MAX_MODEL_LEN, MODEL, SPECIALS, openai_error, served, stream_events, tiny_model_args

VOCAB_SIZE = len(SPECIALS) + 256  # tests.serving's byte-level tokenizer
MAX_LOGPROBS = VOCAB_SIZE + 10  # room for -1 (the whole vocabulary), and a bound to cross
MESSAGES = [{"role": "user", "content": "hi"}]
GREEDY = {"temperature": 0, "max_tokens": 6, "ignore_eos": True}
CLIENT_GREEDY = {"temperature": 0, "max_tokens": 6}  # ignore_eos goes in the openai client's extra_body


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("token-ids-model")
    return directory, tiny_model_args(directory)


@pytest.fixture(scope="module")
def base(model_dir, tmp_path_factory):
    args = [*model_dir[1], "--max-logprobs", str(MAX_LOGPROBS), "--return-tokens-as-token-ids"]
    with served(args, tmp_path_factory.mktemp("token-ids") / "server.log") as url:
        yield url


def tokens_of(http: httpx.Client, text: str) -> list[int]:
    return http.post("/tokenize", json={"prompt": text}).json()["tokens"]


def refused(http: httpx.Client, path: str, body: dict, param: str) -> None:
    """A 400 naming param; the server then still answers."""
    openai_error(http.post(path, json=body), 400, param)
    ok = http.post("/v1/completions", json={"prompt": "ok", "max_tokens": 1})
    assert ok.status_code == 200 and ok.json()["choices"][0]["finish_reason"], ok.text


# return_token_ids ---------------------------------------------------------------------------------


def test_completion_returns_prompt_and_output_token_ids_whole_and_streamed(http, client):
    whole = client.completions.create(
        model=MODEL, prompt="hello", extra_body={"return_token_ids": True, "ignore_eos": True}, **CLIENT_GREEDY
    )
    choice = whole.choices[0].model_dump()
    assert choice["prompt_token_ids"] == tokens_of(http, "hello")
    assert len(choice["token_ids"]) == whole.usage.completion_tokens == 6
    assert http.post("/detokenize", json={"tokens": choice["token_ids"]}).json()["prompt"] == whole.choices[0].text

    events = stream_events(http, "/v1/completions", {"prompt": "hello", "return_token_ids": True, **GREEDY})
    choices = [c for e in events for c in e["choices"]]
    assert choices[0]["prompt_token_ids"] == choice["prompt_token_ids"]
    assert all("prompt_token_ids" not in c for c in choices[1:])  # the first chunk's only
    assert [t for c in choices for t in c["token_ids"]] == choice["token_ids"]

    plain = http.post("/v1/completions", json={"prompt": "hello", **GREEDY}).json()["choices"][0]
    assert "token_ids" not in plain and "prompt_token_ids" not in plain


def test_chat_returns_prompt_and_output_token_ids_whole_and_streamed(http):
    body = {"messages": MESSAGES, "return_token_ids": True, **GREEDY}
    whole = http.post("/v1/chat/completions", json=body).json()
    rendered = http.post("/tokenize", json={"messages": MESSAGES}).json()["tokens"]
    assert whole["prompt_token_ids"] == rendered and whole["usage"]["prompt_tokens"] == len(rendered)
    output_ids = whole["choices"][0]["token_ids"]
    assert len(output_ids) == whole["usage"]["completion_tokens"]

    events = stream_events(http, "/v1/chat/completions", body)
    assert events[0]["prompt_token_ids"] == rendered and all("prompt_token_ids" not in e for e in events[1:])
    assert [t for e in events for c in e["choices"] for t in c.get("token_ids", [])] == output_ids


# Logprob tokens as token ids ----------------------------------------------------------------------


def test_logprob_tokens_as_token_ids_by_flag_unless_the_request_says_otherwise(http):
    body = {"prompt": "hi", "logprobs": 2, "return_token_ids": True, **GREEDY}
    by_flag = http.post("/v1/completions", json=body).json()["choices"][0]
    assert by_flag["logprobs"]["tokens"] == [f"token_id:{t}" for t in by_flag["token_ids"]]
    assert all(k.startswith("token_id:") for top in by_flag["logprobs"]["top_logprobs"] for k in top)
    as_text = http.post("/v1/completions", json={**body, "return_tokens_as_token_ids": False}).json()["choices"][0]
    tokens = as_text["logprobs"]["tokens"]
    assert len(tokens) == 6 and not any(t.startswith("token_id:") for t in tokens)

    events = stream_events(http, "/v1/chat/completions", {
        "messages": MESSAGES, "logprobs": True, "top_logprobs": 1, "return_token_ids": True, **GREEDY,
    })
    content = [lp for e in events for c in e["choices"] if c.get("logprobs") for lp in c["logprobs"]["content"]]
    ids = [t for e in events for c in e["choices"] for t in c.get("token_ids", [])]
    assert [lp["token"] for lp in content] == [f"token_id:{t}" for t in ids]
    assert all(lp["bytes"] == list(lp["token"].encode()) for lp in content)


# allowed_token_ids ---------------------------------------------------------------------------------


def test_allowed_token_ids_are_the_only_ones_sampled(http, client):
    allowed = [10, 11, 12]
    body = {"allowed_token_ids": allowed, "return_token_ids": True, "temperature": 1.0, "seed": 3,
            "max_tokens": 12, "ignore_eos": True}
    whole = http.post("/v1/completions", json={"prompt": "hi", **body}).json()["choices"][0]
    assert len(whole["token_ids"]) == 12 and set(whole["token_ids"]) <= set(allowed)
    events = stream_events(http, "/v1/chat/completions", {"messages": MESSAGES, **body})
    streamed = [t for e in events for c in e["choices"] for t in c.get("token_ids", [])]
    assert len(streamed) == 12 and set(streamed) <= set(allowed)
    unrestricted = http.post("/v1/completions", json={"prompt": "hi", **{**body, "allowed_token_ids": None}}).json()
    assert not set(unrestricted["choices"][0]["token_ids"]) <= set(allowed)
    chat = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, extra_body={"allowed_token_ids": [40], "return_token_ids": True, "ignore_eos": True},
        **CLIENT_GREEDY,
    )
    assert chat.choices[0].model_dump()["token_ids"] == [40] * 6


# truncate_prompt_tokens ------------------------------------------------------------------------------


def test_truncate_prompt_tokens_keeps_the_prompts_last_tokens(http):
    full = tokens_of(http, "abcdefghij")
    body = {"prompt": "abcdefghij", "truncate_prompt_tokens": 3, "return_token_ids": True, "echo": True, **GREEDY}
    whole = http.post("/v1/completions", json=body).json()
    assert whole["choices"][0]["prompt_token_ids"] == full[-3:] and whole["usage"]["prompt_tokens"] == 3
    assert whole["choices"][0]["text"].startswith("hij")  # echo shows what ran
    events = stream_events(http, "/v1/completions", {**body, "stream_options": {"include_usage": True}})
    assert events[0]["choices"][0]["prompt_token_ids"] == full[-3:] and events[-1]["usage"]["prompt_tokens"] == 3
    everything = http.post("/v1/completions", json={**body, "truncate_prompt_tokens": -1}).json()
    assert everything["choices"][0]["prompt_token_ids"] == full  # -1: the last max_model_len tokens
    chat = http.post("/v1/chat/completions", json={"messages": MESSAGES, "truncate_prompt_tokens": 2, **GREEDY})
    assert chat.json()["usage"]["prompt_tokens"] == 2


def test_a_text_far_past_the_context_is_truncated_when_asked_not_refused(http):
    """Refused early without truncate_prompt_tokens (its first characters alone overflow the
    context); with it, cut to its last tokens and served (it was refused all the same)."""
    long_text = "abcdefgh" * MAX_MODEL_LEN  # one token a byte: 8 x the context
    refused = http.post("/v1/completions", json={"prompt": long_text, **GREEDY})
    assert openai_error(refused, 400, "prompt")["code"] == "context_length_exceeded"
    cut = {"truncate_prompt_tokens": 5, "return_token_ids": True, **GREEDY}
    completion = http.post("/v1/completions", json={"prompt": long_text, **cut}).json()
    assert completion["choices"][0]["prompt_token_ids"] == tokens_of(http, long_text[-5:])
    messages = [{"role": "user", "content": long_text}]
    assert http.post("/v1/chat/completions", json={"messages": messages, **cut}).json()["usage"]["prompt_tokens"] == 5


# logprobs: -1 ----------------------------------------------------------------------------------------


def test_minus_one_logprobs_are_the_whole_vocabulary(http):
    body = {"prompt": "hi", "logprobs": -1, "prompt_logprobs": -1, "max_tokens": 2, "temperature": 0}
    choice = http.post("/v1/completions", json=body).json()["choices"][0]
    assert all(len(top) == VOCAB_SIZE for top in choice["logprobs"]["top_logprobs"])
    prompt_positions = choice["prompt_logprobs"]
    assert prompt_positions[0] is None and all(len(p) == VOCAB_SIZE for p in prompt_positions[1:])

    events = stream_events(http, "/v1/chat/completions", {
        "messages": MESSAGES, "logprobs": True, "top_logprobs": -1, "max_tokens": 2, "temperature": 0,
    })
    content = [lp for e in events for c in e["choices"] if c.get("logprobs") for lp in c["logprobs"]["content"]]
    assert len(content) == 2 and all(len(lp["top_logprobs"]) == VOCAB_SIZE for lp in content)


def test_prompt_logprobs_is_null_where_vllm_returns_it(http):
    completion = http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 1}).json()
    assert all("prompt_logprobs" in c and c["prompt_logprobs"] is None for c in completion["choices"])
    chat = http.post("/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 1}).json()
    assert "prompt_logprobs" in chat and chat["prompt_logprobs"] is None


def test_max_logprobs_bounds_what_a_request_asks_for():
    """vLLM's rule, with its default of 20: -1 counts as the vocabulary's size."""
    processor = SimpleNamespace(vocab_size=VOCAB_SIZE, max_logprobs=20)
    assert InputProcessor._resolve_logprobs(processor, SamplingParams(logprobs=20)).logprobs == 20
    for name in ("logprobs", "prompt_logprobs"):
        for asked in (21, -1):
            with pytest.raises(ValueError, match=rf"^{name}={asked} .*max allowed \(20, --max-logprobs\)"):
                InputProcessor._resolve_logprobs(processor, SamplingParams(**{name: asked}))
    unbounded = SimpleNamespace(vocab_size=VOCAB_SIZE, max_logprobs=VOCAB_SIZE)
    assert InputProcessor._resolve_logprobs(unbounded, SamplingParams(prompt_logprobs=-1)).prompt_logprobs == VOCAB_SIZE


# Wrong requests ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("route, field, value, param", [
    ("/v1/completions", "allowed_token_ids", "x", "allowed_token_ids"),
    ("/v1/completions", "allowed_token_ids", [], "allowed_token_ids"),
    ("/v1/completions", "allowed_token_ids", [VOCAB_SIZE], "allowed_token_ids"),
    ("/v1/chat/completions", "allowed_token_ids", [-1], "allowed_token_ids"),
    ("/v1/completions", "truncate_prompt_tokens", 0, "truncate_prompt_tokens"),
    ("/v1/completions", "truncate_prompt_tokens", -2, "truncate_prompt_tokens"),
    ("/v1/completions", "truncate_prompt_tokens", "all", "truncate_prompt_tokens"),
    ("/v1/chat/completions", "truncate_prompt_tokens", 5000, "truncate_prompt_tokens"),
    ("/v1/completions", "return_token_ids", "maybe", "return_token_ids"),
    ("/v1/chat/completions", "return_tokens_as_token_ids", [1], "return_tokens_as_token_ids"),
    ("/v1/completions", "logprobs", -2, "logprobs"),
    ("/v1/completions", "logprobs", MAX_LOGPROBS + 1, "logprobs"),
    ("/v1/completions", "prompt_logprobs", MAX_LOGPROBS + 1, "prompt_logprobs"),
    ("/v1/chat/completions", "top_logprobs", MAX_LOGPROBS + 1, "top_logprobs"),
    ("/v1/chat/completions", "top_logprobs", -2, "top_logprobs"),
])
def test_wrong_value_is_a_400_naming_the_field(http, route, field, value, param):
    body = {"prompt": "hi"} if route == "/v1/completions" else {"messages": MESSAGES, "logprobs": True}
    refused(http, route, {**body, "max_tokens": 2, field: value}, param)


@pytest.mark.parametrize("route, body, param", [
    ("/v1/completions", {"prompt": "a" * 1020, "max_tokens": 10}, "prompt"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a" * 1020}], "max_tokens": 10}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a" * 1030}]}, "messages"),
])
def test_too_long_prompt_names_the_prompts_field(http, route, body, param):
    error = openai_error(http.post(route, json=body), 400, param)
    assert error["code"] == "context_length_exceeded"


# Offline ---------------------------------------------------------------------------------------------


def test_offline_sampling_params_allowed_token_ids_and_truncate_prompt_tokens(model_dir):
    path = model_dir[1][0]
    llm = LLM(model=path, device="cpu", max_model_len=64, num_gpu_blocks_override=32)
    prompt = list(range(20, 40))
    params = SamplingParams(allowed_token_ids=[7, 9], truncate_prompt_tokens=5, max_tokens=8, ignore_eos=True, seed=1)
    output = llm.generate({"prompt_token_ids": prompt}, params, use_tqdm=False)[0]
    assert output.prompt_token_ids == prompt[-5:]
    assert len(output.outputs[0].token_ids) == 8 and set(output.outputs[0].token_ids) <= {7, 9}
    with pytest.raises(ValueError, match="allowed_token_ids"):
        llm.generate({"prompt_token_ids": prompt}, SamplingParams(allowed_token_ids=[VOCAB_SIZE]), use_tqdm=False)
    with pytest.raises(ValueError, match="truncate_prompt_tokens"):
        llm.generate({"prompt_token_ids": prompt}, SamplingParams(truncate_prompt_tokens=65), use_tqdm=False)
    llm.shutdown()
