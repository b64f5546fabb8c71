"""Bad input a schema does not express, each a 400 naming the field while the server goes on:
integers wider than the engine's 64 bits in every integer field, lone UTF-16 surrogates, n past
OpenAI's cap of 128, token ids outside the vocabulary; plus the shape of errors in a stream, the
OpenAPI schema's error responses, CORS, and the offline SamplingParams' own checks."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import httpx
import pytest

from pagoda.entrypoints.openai.serving_engine import OpenAIError, sse_stream
from pagoda.sampling_params import MAX_N_SEQUENCES, SamplingParams
from tests.serving import API_KEY, MODEL, SPECIALS, openai_error, serving, tiny_model_args

TOO_WIDE = [2**64, 2**63, -(2**63) - 1]
VOCAB_SIZE = len(SPECIALS) + 256  # tests.serving's byte-level tokenizer
CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
COMPLETION = {"prompt": "hi", "max_tokens": 1}

COMPLETION_INTS = [
    "n", "seed", "max_tokens", "top_k", "min_tokens", "logprobs", "prompt_logprobs", "best_of", "priority",
]
CHAT_INTS = ["n", "seed", "max_tokens", "max_completion_tokens", "top_k", "min_tokens", "top_logprobs",
             "prompt_logprobs"]


@pytest.fixture(scope="module")
def model_args(tmp_path_factory) -> list[str]:
    return tiny_model_args(tmp_path_factory.mktemp("validation-model"))


@pytest.fixture(scope="module")
def base(model_args, tmp_path_factory):
    log = tmp_path_factory.mktemp("validation") / "server.log"
    with serving(model_args, log, {"PAGODA_API_KEY": API_KEY}) as (_, url):
        yield url


@pytest.fixture(scope="module")
def http(base):
    # Bounded: before the fix a too-wide integer killed the engine-facing thread and every later
    # request hung.
    with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30.0) as c:
        yield c


def post_json(http: httpx.Client, path: str, body: object) -> httpx.Response:
    """json.dumps writes a lone surrogate as the escape "\\ud800", as a client in another language would."""
    return http.post(path, content=json.dumps(body).encode(), headers={"content-type": "application/json"})


def refused(http: httpx.Client, path: str, body: object, param: str) -> dict:
    """The request is a 400 naming param, and the server still answers a normal request."""
    error = openai_error(post_json(http, path, body), 400, param)
    ok = http.post("/v1/completions", json={**COMPLETION, "temperature": 0})
    assert ok.status_code == 200 and ok.json()["choices"][0]["finish_reason"], ok.text
    return error


# Integer widths -------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", TOO_WIDE)
@pytest.mark.parametrize("field", COMPLETION_INTS)
def test_completion_integer_wider_than_64_bits_is_refused_by_name(http, field, value):
    refused(http, "/v1/completions", {**COMPLETION, field: value}, field)


@pytest.mark.parametrize("value", TOO_WIDE)
@pytest.mark.parametrize("field", CHAT_INTS)
def test_chat_integer_wider_than_64_bits_is_refused_by_name(http, field, value):
    body = {**CHAT, field: value, **({"logprobs": True} if field == "top_logprobs" else {})}
    refused(http, "/v1/chat/completions", body, field)


@pytest.mark.parametrize("path, base_body", [("/v1/completions", COMPLETION), ("/v1/chat/completions", CHAT)])
@pytest.mark.parametrize("field, make", [
    ("stop_token_ids", lambda v: [5, v]),
    ("logit_bias", lambda v: {str(v): 1.0}),
])
@pytest.mark.parametrize("value", TOO_WIDE)
def test_token_id_lists_and_keys_wider_than_64_bits_are_refused_by_name(http, path, base_body, field, make, value):
    refused(http, path, {**base_body, field: make(value)}, field)


@pytest.mark.parametrize("prompt", [[2**64], [5, 2**63], [[5], [2**64]], [-(2**63) - 1]])
def test_prompt_token_id_wider_than_64_bits_is_refused_as_prompt(http, prompt):
    error = refused(http, "/v1/completions", {**COMPLETION, "prompt": prompt}, "prompt")
    assert "valid string" not in error["message"]  # the range, not a union branch's type mismatch


@pytest.mark.parametrize("tokens", [[2**64], [-1], [VOCAB_SIZE]])
def test_detokenize_token_outside_the_vocabulary_or_64_bits_is_refused(http, tokens):
    refused(http, "/detokenize", {"tokens": tokens}, "tokens")


@pytest.mark.parametrize("prompt", [[VOCAB_SIZE], [5, 2**63 - 1], [[5], [VOCAB_SIZE + 1000]]])
def test_prompt_token_id_outside_the_vocabulary_is_refused_as_prompt(http, prompt):
    refused(http, "/v1/completions", {**COMPLETION, "prompt": prompt}, "prompt")


@pytest.mark.parametrize("path, base_body", [("/v1/completions", COMPLETION), ("/v1/chat/completions", CHAT)])
def test_logit_bias_outside_the_vocabulary_is_refused_by_name(http, path, base_body):
    refused(http, path, {**base_body, "logit_bias": {"5": 1, str(VOCAB_SIZE): 1}}, "logit_bias")


@pytest.mark.parametrize("seed", [2**63 - 1, -(2**63)])
def test_seed_at_the_64_bit_edges_is_served(http, seed):
    response = http.post("/v1/completions", json={**COMPLETION, "seed": seed})
    assert response.status_code == 200, response.text


def test_seed_whose_nth_child_would_overflow_is_refused(http):
    refused(http, "/v1/completions", {**COMPLETION, "seed": 2**63 - 1, "n": 2}, "seed")


# n and top_logprobs -------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [129, 100_000])
@pytest.mark.parametrize("path, base_body", [("/v1/completions", COMPLETION), ("/v1/chat/completions", CHAT)])
def test_n_past_128_is_refused(http, path, base_body, n):
    error = refused(http, path, {**base_body, "n": n}, "n")
    assert "128" in error["message"]


@pytest.mark.parametrize("path, base_body", [("/v1/completions", COMPLETION), ("/v1/chat/completions", CHAT)])
def test_a_priority_other_than_0_is_refused_without_priority_scheduling(http, path, base_body):
    openai_error(http.post(path, json={**base_body, "priority": 1}), 400, "priority")
    assert http.post(path, json={**base_body, "priority": 0}).status_code == 200


def test_a_request_nested_past_pythons_recursion_limit_is_a_400(http):
    """A tool's parameters or a schema nested hundreds deep: the client's error, not a 500."""
    nested: dict = {"type": "string"}
    for _ in range(450):
        nested = {"type": "object", "properties": {"a": nested}}
    tools = [{"type": "function", "function": {"name": "f", "parameters": nested}}]
    openai_error(http.post("/v1/chat/completions", json={**CHAT, "tools": tools, "tool_choice": "required"}), 400)
    deep_text = '{"type":"object","properties":{"a":' * 1000 + '{"type":"string"}' + "}}" * 1000
    openai_error(http.post("/v1/completions", json={**COMPLETION, "guided_json": deep_text}), 400, "guided_json")
    assert http.post("/v1/completions", json=COMPLETION).status_code == 200


def test_n_of_128_is_served(http):
    response = http.post("/v1/completions", json={**COMPLETION, "n": 128})
    assert response.status_code == 200 and len(response.json()["choices"]) == 128


def test_top_logprobs_past_20_names_top_logprobs(http):
    refused(http, "/v1/chat/completions", {**CHAT, "logprobs": True, "top_logprobs": 21}, "top_logprobs")


# Lone surrogates ----------------------------------------------------------------------------------

LONE = "a\ud800b"


@pytest.mark.parametrize("path, body, param", [
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": LONE}]}, "messages"),
    ("/v1/chat/completions",
     {**CHAT, "messages": [{"role": "user", "content": [{"type": "text", "text": "\udfff"}]}]}, "messages"),
    ("/v1/chat/completions", {**CHAT, "stop": LONE}, "stop"),
    ("/v1/completions", {**COMPLETION, "prompt": LONE}, "prompt"),
    ("/v1/completions", {**COMPLETION, "prompt": ["ok", LONE]}, "prompt"),
    ("/v1/completions", {**COMPLETION, "stop": LONE}, "stop"),
    ("/v1/completions", {**COMPLETION, "stop": ["ok", LONE]}, "stop"),
    ("/tokenize", {"prompt": LONE}, "prompt"),
    ("/tokenize", {"messages": [{"role": "user", "content": LONE}]}, "messages"),
])
def test_lone_surrogate_is_refused_by_name(http, path, body, param):
    error = refused(http, path, body, param)
    assert "surrogate" in error["message"]


def test_a_surrogate_pair_is_valid_text(http):
    response = post_json(http, "/tokenize", {"prompt": "\U0001F600"})  # JSON "\ud83d\ude00"
    assert response.status_code == 200 and response.json()["count"] == 4  # its four UTF-8 bytes


# Errors in a stream, the OpenAPI schema, CORS -----------------------------------------------------


async def _events(chunks) -> list[str]:
    engine = SimpleNamespace(abort=lambda ids: None)
    return [event async for event in sse_stream(chunks, engine, ["r-0"])]


@pytest.mark.parametrize("error, status_param_code", [
    (OpenAIError("too long", param="max_tokens", code="context_length_exceeded"),
     ("invalid_request_error", "max_tokens", "context_length_exceeded")),
    (OpenAIError("plain"), ("invalid_request_error", None, None)),
    (KeyError("bug"), ("server_error", None, None)),
])
def test_error_event_in_a_stream_has_the_whole_error_shape(error, status_param_code):
    async def chunks():
        yield "data: {}\n\n"
        raise error

    events = asyncio.run(_events(chunks()))
    assert events[0] == "data: {}\n\n" and events[-1] == "data: [DONE]\n\n"
    body = json.loads(events[1].removeprefix("data: "))["error"]
    assert set(body) == {"message", "type", "param", "code"} and body["message"]
    assert (body["type"], body["param"], body["code"]) == status_param_code


def test_openapi_declares_400_with_the_error_body_not_422(http):
    schema = http.get("/openapi.json").json()
    posts = {path: ops["post"] for path, ops in schema["paths"].items() if "post" in ops}
    assert set(posts) == {
        "/v1/completions", "/v1/chat/completions", "/v1/responses", "/tokenize", "/detokenize", "/invocations",
        "/v1/embeddings", "/score", "/v1/score", "/rerank", "/v1/rerank", "/v2/rerank", "/classify",
        "/v1/responses/{response_id}/cancel",
    }
    for path, op in posts.items():
        assert "422" not in op["responses"], path
        body = op["responses"]["400"]["content"]["application/json"]["schema"]
        assert body == {"$ref": "#/components/schemas/ErrorResponse"}, path
    assert "HTTPValidationError" not in schema["components"]["schemas"]
    seed = schema["components"]["schemas"]["CompletionRequest"]["properties"]["seed"]["anyOf"][0]
    assert (seed["minimum"], seed["exclusiveMaximum"]) == (-(2**63), 2**63)  # exact, though written as floats


@pytest.mark.parametrize("origin", ["null", "https://evil.example"])
def test_cors_by_default_allows_any_origin_without_credentials(http, origin):
    simple = http.get("/v1/models", headers={"Origin": origin})
    assert simple.headers["access-control-allow-origin"] == "*"
    assert "access-control-allow-credentials" not in simple.headers
    preflight = http.options("/v1/chat/completions", headers={
        "Origin": origin, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization",
    })
    assert preflight.status_code == 200 and "access-control-allow-credentials" not in preflight.headers


def test_cors_flags_reach_the_middleware(model_args, tmp_path):
    site = "https://app.example"
    flags = ["--allowed-origins", json.dumps([site]), "--allow-credentials", "--allowed-methods", '["POST"]',
             "--allowed-headers", '["Authorization"]']
    with serving(model_args + flags, tmp_path / "server.log") as (_, url):
        def preflight(origin: str, method: str = "POST", headers: str = "authorization") -> httpx.Response:
            return httpx.options(f"{url}/v1/completions", headers={
                "Origin": origin, "Access-Control-Request-Method": method, "Access-Control-Request-Headers": headers,
            })

        allowed = preflight(site)
        assert allowed.status_code == 200
        assert allowed.headers["access-control-allow-origin"] == site
        assert allowed.headers["access-control-allow-credentials"] == "true"
        assert allowed.headers["access-control-allow-methods"] == "POST"
        assert preflight("null").status_code == 400  # an origin not in the list
        assert preflight(site, method="DELETE").status_code == 400
        assert preflight(site, headers="x-other").status_code == 400
        simple = httpx.post(f"{url}/v1/completions", json={**COMPLETION, "model": MODEL}, headers={"Origin": "null"})
        assert simple.status_code == 200 and "access-control-allow-origin" not in simple.headers


def test_the_scheduling_policy_flag_lets_requests_give_a_priority(model_args, tmp_path):
    with serving(model_args + ["--scheduling-policy", "priority"], tmp_path / "server.log") as (_, url):
        http = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60)
        for path, body in (("/v1/completions", COMPLETION), ("/v1/chat/completions", CHAT)):
            for priority in (-3, 0, 7):
                assert http.post(path, json={**body, "model": MODEL, "priority": priority}).status_code == 200


# The offline path: SamplingParams refuses the same values -------------------------------------------


@pytest.mark.parametrize("name", ["n", "seed", "top_k", "max_tokens", "min_tokens", "logprobs", "prompt_logprobs"])
@pytest.mark.parametrize("value", TOO_WIDE)
def test_sampling_params_refuse_integers_wider_than_64_bits(name, value):
    with pytest.raises(ValueError, match=f"^{name}="):
        SamplingParams(**{name: value})


@pytest.mark.parametrize("name, value", [
    ("stop_token_ids", [1, 2**63]), ("logit_bias", {2**64: 1.0}), ("logit_bias", {str(2**63): 1.0}),
    ("n", MAX_N_SEQUENCES + 1), ("seed", 2**63 - 2),  # with n=3, child 2 would use seed 2**63
])
def test_sampling_params_refuse_token_ids_past_64_bits_and_n_past_vllms_cap(name, value):
    with pytest.raises(ValueError, match=f"^{name}="):
        SamplingParams(**{name: value, "n": 3} if name == "seed" else {name: value})


def test_sampling_params_accept_the_64_bit_edges():
    assert SamplingParams(seed=2**63 - 1).seed == 2**63 - 1
    assert SamplingParams(seed=-(2**63), n=MAX_N_SEQUENCES).n == MAX_N_SEQUENCES
    assert SamplingParams(stop_token_ids=[2**63 - 1], logit_bias={str(2**63 - 1): 1.0}).stop_token_ids == [2**63 - 1]
