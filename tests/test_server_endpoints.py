"""vLLM's server endpoints and options beyond the OpenAI routes, through one `pagoda serve` started as a
vLLM user would start it (`--model X`, the key in $VLLM_API_KEY, behind a proxy's --root-path):
/tokenize's token_strs, /tokenizer_info (--enable-tokenizer-info-endpoint), /invocations
(SageMaker's route, dispatching on the body), /load (--enable-server-load-tracking) and
--enable-force-include-usage; each wrong request a 400 naming its field while the server goes on."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from collections.abc import AsyncIterator
from types import SimpleNamespace

import httpx
import openai
import pytest
from fastapi.testclient import TestClient
from transformers import AutoTokenizer

from pagoda.entrypoints.cli import build_parser
from pagoda.entrypoints.openai.cli_args import model_argument
from pagoda.entrypoints.openai.server import Endpoints, build_app
from pagoda.entrypoints.openai.serving_engine import ServerConfig
from pagoda.outputs import CompletionOutput, RequestOutput
from tests.serving import (
    CHAT_TEMPLATE, MAX_MODEL_LEN, MODEL, http_client, openai_error, serving, sse_events, tiny_model_args,
)

KEY = "vllm-style-key"
ROOT = "/llm"
MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("endpoints-model")
    return directory, tiny_model_args(directory)


@pytest.fixture(scope="module")
def base(model_dir, tmp_path_factory):
    path, *rest = model_dir[1]
    args = ["--model", path, *rest, "--root-path", ROOT, "--enable-tokenizer-info-endpoint",
            "--enable-server-load-tracking", "--enable-force-include-usage", "--enable-request-id-headers"]
    env = {"VLLM_API_KEY": KEY, "PAGODA_API_KEY": ""}
    with serving(args, tmp_path_factory.mktemp("endpoints") / "server.log", env) as (_, url):
        yield url


@pytest.fixture(scope="module")
def http(base):
    with http_client(base, KEY) as c:
        yield c


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return AutoTokenizer.from_pretrained(model_dir[0] / "llama3")


def still_serves(http: httpx.Client) -> None:
    ok = http.post("/v1/completions", json={"prompt": "ok", "max_tokens": 1})
    assert ok.status_code == 200 and ok.json()["choices"][0]["finish_reason"], ok.text


# Started as vLLM is ---------------------------------------------------------------------------


def test_model_flag_and_the_vllm_api_key(http, base):
    model = http.get("/v1/models").json()["data"][0]
    assert model["id"] == MODEL and model["max_model_len"] == MAX_MODEL_LEN  # the tiny model, not the default
    assert httpx.get(f"{base}/v1/models").status_code == 401
    assert httpx.get(f"{base}{ROOT}/v1/models").status_code == 401  # the prefix is no way around the key
    assert httpx.post(f"{base}/invocations", json={"prompt": "hi", "max_tokens": 1}).status_code == 401


def test_a_model_is_retrieved_by_its_id_as_openais_client_asks(http, base):
    client = openai.OpenAI(base_url=f"{base}/v1", api_key=KEY, timeout=60.0, max_retries=0)
    listed = http.get("/v1/models").json()["data"][0]
    retrieved = client.models.retrieve(MODEL).model_dump(exclude_none=True)
    # `created` is each answer's own time (as vLLM's): the two may fall either side of a second.
    assert 0 <= retrieved.pop("created") - listed.pop("created") <= 1
    assert retrieved == {k: v for k, v in listed.items() if v is not None}
    with pytest.raises(openai.NotFoundError) as caught:
        client.models.retrieve("no-such-model")
    assert caught.value.body["code"] == "model_not_found"
    assert httpx.get(f"{base}/v1/models/{MODEL}").status_code == 401  # it needs the key, as the list does


def test_responses_carry_the_request_id_given_or_a_new_one(http, base):
    given = http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 1}, headers={"X-Request-Id": "trace-7"})
    assert given.status_code == 200 and given.headers["x-request-id"] == "trace-7"
    with http.stream("POST", "/v1/completions", json={"prompt": "hi", "max_tokens": 2, "stream": True},
                     headers={"X-Request-Id": "trace-8"}) as streamed:
        assert streamed.headers["x-request-id"] == "trace-8"
    fresh = [httpx.get(f"{base}/v1/models").headers["x-request-id"] for _ in range(2)]  # a 401 too
    assert len(set(fresh)) == 2 and all(len(i) == 32 for i in fresh)


def test_ping_is_sagemakers_health_check(base):
    assert httpx.get(f"{base}/ping").status_code == 200 and httpx.post(f"{base}/ping").status_code == 200


def test_model_positional_or_flag_as_vllm_parses_them():
    parse = build_parser().parse_args
    assert model_argument(parse(["serve", "--model", "a"])) == "a"
    assert model_argument(parse(["serve", "b"])) == "b"
    assert model_argument(parse(["serve", "b", "--model", "a"])) == "b"  # the positional wins, as in vLLM
    assert model_argument(parse(["serve"])) is None


def test_root_path_serves_behind_a_proxy_with_or_without_the_prefix(http, base):
    assert http.get(f"{ROOT}/v1/models").json()["data"][0]["id"] == MODEL
    assert http.get("/v1/models").status_code == 200  # a proxy that strips the prefix
    assert {"url": ROOT} in http.get("/openapi.json").json()["servers"]
    client = openai.OpenAI(base_url=f"{base}{ROOT}/v1", api_key=KEY, timeout=60.0, max_retries=0)
    assert client.completions.create(model=MODEL, prompt="hi", max_tokens=2).usage.completion_tokens == 2


# /tokenize and /tokenizer_info --------------------------------------------------------------------


def test_tokenize_returns_token_strings_when_asked(http, tokenizer):
    answer = http.post("/tokenize", json={"prompt": "hé!", "return_token_strs": True}).json()
    assert answer["token_strs"] == tokenizer.convert_ids_to_tokens(answer["tokens"]) and len(answer["tokens"]) == 4
    chat = http.post("/tokenize", json={"messages": MESSAGES, "return_token_strs": True}).json()
    assert chat["token_strs"] == tokenizer.convert_ids_to_tokens(chat["tokens"])
    assert "token_strs" not in http.post("/tokenize", json={"prompt": "hé!"}).json()
    openai_error(http.post("/tokenize", json={"prompt": "hé!", "return_token_strs": "maybe"}), 400, "return_token_strs")
    still_serves(http)


def test_tokenize_refuses_a_request_chat_template_without_the_flag(http):
    """vLLM's: /tokenize takes a request's chat_template only where the chat route would
    (--trust-request-chat-template, not given here); chat_template_kwargs are checked as there."""
    body = {"messages": MESSAGES, "chat_template": "{{ messages }}"}
    refused = openai_error(http.post("/tokenize", json=body), 400, "chat_template")
    assert "--trust-request-chat-template" in refused["message"]
    bad_kwargs = {"messages": MESSAGES, "chat_template_kwargs": {"add_generation_prompt": False}}
    openai_error(http.post("/tokenize", json=bad_kwargs), 400, "chat_template_kwargs")
    still_serves(http)


def test_tokenizer_info_describes_the_tokenizer(http, tokenizer):
    info = http.get("/tokenizer_info").json()
    assert info["tokenizer_class"] == type(tokenizer).__name__
    assert info["chat_template"] == CHAT_TEMPLATE
    assert (info["bos_token"], info["eos_token"]) == ("<|endoftext|>", "<|im_end|>")
    assert "vocab_file" not in info and "merges_file" not in info


def test_optional_endpoints_are_off_by_default():
    """Without the flags: no /tokenizer_info, /load reports 0 whatever runs (as in vLLM), and no
    X-Request-Id header."""
    app = TestClient(build_app(HeldEngine(), ServerConfig([MODEL], 64, None, False)))
    assert app.get("/tokenizer_info").status_code == 404
    load = app.get("/load", headers={"X-Request-Id": "trace-1"})
    assert load.json() == {"server_load": 0} and "x-request-id" not in load.headers


def test_any_of_several_api_keys_is_taken(monkeypatch):
    """vLLM's --api-key takes several keys (to rotate them); $VLLM_API_KEY gives one."""
    args = build_parser().parse_args(["serve", "--api-key", "old", "new"])
    app = TestClient(build_app(HeldEngine(), ServerConfig([MODEL], 64, None, False), args.api_key))
    for key, status in (("old", 200), ("new", 200), ("other", 401)):
        assert app.get("/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code == status, key
    assert app.get("/v1/models").status_code == 401 and app.get("/load").status_code == 200  # not under /v1
    monkeypatch.delenv("PAGODA_API_KEY", raising=False)
    monkeypatch.setenv("VLLM_API_KEY", "from-env")
    assert build_parser().parse_args(["serve"]).api_key == ["from-env"]


# /invocations --------------------------------------------------------------------------------------


def test_invocations_dispatch_on_the_body(http):
    chat = http.post("/invocations", json={"messages": MESSAGES, "max_tokens": 3}).json()
    assert chat["object"] == "chat.completion" and chat["usage"]["completion_tokens"] <= 3
    completion = http.post("/invocations", json={"prompt": "hi", "max_tokens": 3, "ignore_eos": True}).json()
    assert completion["object"] == "text_completion" and completion["usage"]["completion_tokens"] == 3
    with http.stream("POST", "/invocations", json={"prompt": "hi", "max_tokens": 3, "stream": True}) as response:
        events = sse_events(response)
    assert events[0]["object"] == "text_completion" and events[-1]["usage"]["completion_tokens"] <= 3


@pytest.mark.parametrize("body, param", [
    ({"messages": MESSAGES, "temperature": "hot"}, "temperature"),
    ({"prompt": "hi", "max_tokens": "many"}, "max_tokens"),
    ({"prompt": "hi", "allowed_token_ids": [-3]}, "allowed_token_ids"),
    ({"input": "hi"}, None),
    (["hi"], None),
])
def test_invocations_refuse_what_no_route_takes(http, body, param):
    error = openai_error(http.post("/invocations", json=body), 400, param)
    if param is None:
        assert "Cannot find suitable handler" in error["message"]
    still_serves(http)


def test_invocations_refuse_a_body_that_is_not_json(http):
    response = http.post("/invocations", content=b"{not json", headers={"content-type": "application/json"})
    assert "not valid JSON" in openai_error(response, 400)["message"]
    still_serves(http)


# /load -----------------------------------------------------------------------------------------------


class HeldEngine:
    """An engine stand-in whose requests each give one token once the test releases them."""

    tokenizer = None
    num_gpu_blocks = 0
    max_model_len = 64
    # What /metrics' cache_config_info reads.
    config = SimpleNamespace(cache=SimpleNamespace(
        block_size=16, num_gpu_blocks_override=None, gpu_memory_utilization=0.9, kv_cache_memory_bytes=None,
        enable_prefix_caching=True,
    ))

    def __init__(self) -> None:
        self.finished_listeners: list = []
        self.iteration_listeners: list = []
        self.released = threading.Event()

    async def add_request(
        self, request_id: str, prompt_token_ids: list[int], params, prompt, lora_request=None, images=(),
        cache_salt=None, priority=0, token_type_ids=None,
    ) -> AsyncIterator:
        return self._outputs(request_id, prompt_token_ids)

    async def _outputs(self, request_id: str, prompt_token_ids: list[int]) -> AsyncIterator[RequestOutput]:
        while not self.released.is_set():
            await asyncio.sleep(0.01)
        child = CompletionOutput(0, "x", [5], None, None, "length", text_delta="x")
        yield RequestOutput(request_id, None, prompt_token_ids, None, [child], True)

    def abort(self, request_ids=None) -> None:
        pass


def wait_for_load(app: TestClient, load: int) -> int:
    """The server's load once it is `load`, or after a bounded wait."""
    deadline = time.monotonic() + 30
    while (now := app.get("/load").json()["server_load"]) != load and time.monotonic() < deadline:
        time.sleep(0.01)
    return now


@pytest.mark.parametrize("stream", [False, True])
def test_load_counts_generation_requests_until_their_response_ends(stream):
    engine = HeldEngine()
    app = TestClient(build_app(engine, ServerConfig([MODEL], 64, None, False), endpoints=Endpoints(
        server_load_tracking=True)))
    body = {"prompt": [1, 2], "max_tokens": 1, "stream": stream}
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        running = [pool.submit(app.post, path, json=body) for path in ("/v1/completions", "/invocations")]
        assert wait_for_load(app, 2) == 2
        engine.released.set()
        assert all(r.result().status_code == 200 for r in running)
    assert wait_for_load(app, 0) == 0
    assert app.post("/v1/completions", json={**body, "n": 0}).status_code == 400
    assert app.get("/load").json() == {"server_load": 0}  # refusals leave too


def test_load_on_the_served_model(http):
    assert http.get("/load").json() == {"server_load": 0}
    assert http.post("/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 2}).status_code == 200
    openai_error(http.post("/v1/chat/completions", json={"messages": MESSAGES, "n": 0}), 400, "n")
    assert http.get("/load").json() == {"server_load": 0}


# --enable-force-include-usage ------------------------------------------------------------------------


def test_force_include_usage_streams_usage_without_stream_options(http):
    for path, body in [("/v1/completions", {"prompt": "hi"}), ("/v1/chat/completions", {"messages": MESSAGES})]:
        with http.stream("POST", path, json={**body, "max_tokens": 3, "ignore_eos": True, "stream": True}) as r:
            events = sse_events(r)
        assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == 3
        assert all("usage" in e for e in events)
