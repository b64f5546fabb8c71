"""LoRA adapters through `pagoda serve` and the openai client: --lora-modules (name=path and the
JSON form) listed by /v1/models with their parent, a request's `model` picking its adapter
(whole and streamed, the tokens offline LLM gives with the same adapter), an unknown name a 404,
and /v1/load_lora_adapter and /v1/unload_lora_adapter, which exist only when
VLLM_ALLOW_RUNTIME_LORA_UPDATING is set, with a 400 for a bad adapter and a 404 for an unknown one."""

from __future__ import annotations

import json

import openai
import pytest

pytest.importorskip("peft")

from pagoda import LLM, SamplingParams
from pagoda.lora.request import LoRARequest
from tests.lora_adapters import save_peft_adapter
from tests.serving import (
    API_KEY,
    MODEL,
    http_client,
    openai_client,
    openai_error,
    serving,
    tiny_model_args,
)

PROMPT = "Once upon a time"
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    directory = tmp_path_factory.mktemp("lora-server")
    args = tiny_model_args(directory)
    adapters = {f"a{seed}": save_peft_adapter(directory / "llama3", directory, seed=seed) for seed in (1, 2, 3)}
    return directory, args, adapters


@pytest.fixture(scope="module")
def expected(setup):
    """Offline LLM's greedy text of PROMPT with each adapter (None: the base model)."""
    directory, _, adapters = setup
    llm = LLM(model=str(directory / "llama3"), device="cpu", enable_lora=True, max_loras=3)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    loras = {None: None, **{name: LoRARequest(name, i, str(path)) for i, (name, path) in enumerate(adapters.items(), 1)}}
    texts = {name: llm.generate(PROMPT, params, use_tqdm=False, lora_request=lora)[0].outputs[0].text
             for name, lora in loras.items()}
    llm.shutdown()
    assert len(set(texts.values())) == len(texts)  # each adapter changes the text
    return texts


@pytest.fixture(scope="module")
def server(setup, tmp_path_factory):
    _, args, adapters = setup
    modules = ["a1=" + str(adapters["a1"]), json.dumps({"name": "a2", "path": str(adapters["a2"])})]
    env = {"PAGODA_API_KEY": API_KEY, "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "true"}
    log = tmp_path_factory.mktemp("logs") / "server.log"
    with serving([*args, "--enable-lora", "--max-loras", "2", "--lora-modules", *modules], log, env) as (_, base):
        yield base


def _complete(client: openai.OpenAI, model: str) -> str:
    reply = client.completions.create(model=model, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0.0,
                                      extra_body={"ignore_eos": True})
    assert reply.model == model  # an adapter's name, as vLLM answers
    return reply.choices[0].text


def _streamed(client: openai.OpenAI, model: str) -> str:
    stream = client.completions.create(model=model, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0.0,
                                       stream=True, extra_body={"ignore_eos": True})
    chunks = list(stream)
    assert {chunk.model for chunk in chunks} == {model}
    return "".join(chunk.choices[0].text for chunk in chunks if chunk.choices)


def test_models_lists_adapters_with_their_parent(server, setup):
    _, _, adapters = setup
    cards = {m.id: m for m in openai_client(server).models.list().data}
    assert set(cards) == {MODEL, "a1", "a2"}
    assert cards["a1"].parent == cards["a2"].parent == MODEL
    assert cards["a1"].root == str(adapters["a1"])


def test_model_name_picks_the_adapter_whole_and_streamed(server, expected):
    client = openai_client(server)
    for model, adapter in [(MODEL, None), ("a1", "a1"), ("a2", "a2")]:
        assert _complete(client, model) == expected[adapter]
        assert _streamed(client, model) == expected[adapter]


def test_chat_with_an_adapter(server):
    client = openai_client(server)
    messages = [{"role": "user", "content": "hi"}]
    replies = {model: client.chat.completions.create(model=model, messages=messages, max_tokens=MAX_TOKENS,
                                                     temperature=0.0) for model in (MODEL, "a1")}
    assert replies["a1"].model == "a1"
    assert replies[MODEL].choices[0].message.content != replies["a1"].choices[0].message.content


def test_unknown_model_is_a_404(server):
    with http_client(server) as http:
        response = http.post("/v1/completions", json={"model": "nope", "prompt": PROMPT, "max_tokens": 2})
        assert openai_error(response, 404, "model")["code"] == "model_not_found"


def test_load_and_unload_at_run_time(server, setup, expected):
    _, _, adapters = setup
    client = openai_client(server)
    with http_client(server) as http:
        response = http.post("/v1/load_lora_adapter", json={"lora_name": "a3", "lora_path": str(adapters["a3"])})
        assert response.status_code == 200, response.text
        assert "a3" in {m.id for m in client.models.list().data}
        assert _complete(client, "a3") == expected["a3"]
        # Three adapters over two device slots: each request still gets its own.
        assert [_complete(client, m) for m in ("a1", "a2", "a3", "a1")] == [expected[m] for m in ("a1", "a2", "a3", "a1")]
        again = http.post("/v1/load_lora_adapter", json={"lora_name": "a3", "lora_path": str(adapters["a3"])})
        assert "already been loaded" in openai_error(again, 400, "lora_name")["message"]
        response = http.post("/v1/unload_lora_adapter", json={"lora_name": "a3"})
        assert response.status_code == 200, response.text
        assert "a3" not in {m.id for m in client.models.list().data}
        with pytest.raises(openai.NotFoundError):
            _complete(client, "a3")
        openai_error(http.post("/v1/unload_lora_adapter", json={"lora_name": "a3"}), 404, "lora_name")
    assert _complete(client, "a1") == expected["a1"]  # the others are served on


def test_bad_adapters_are_400s(server, setup, tmp_path):
    _, _, adapters = setup
    wide = save_peft_adapter(setup[0] / "llama3", tmp_path, seed=4, rank=32)  # above --max-lora-rank 16
    with http_client(server) as http:
        cases = [
            ({"lora_name": "x", "lora_path": str(tmp_path / "nowhere")}, "lora_path", "adapter_config.json"),
            ({"lora_name": "x", "lora_path": str(wide)}, "lora_path", "max_lora_rank"),
            ({"lora_name": "", "lora_path": str(adapters["a3"])}, "lora_name", "must be provided"),
        ]
        for body, param, message in cases:
            assert message in openai_error(http.post("/v1/load_lora_adapter", json=body), 400, param)["message"]
        openai_error(http.post("/v1/load_lora_adapter", json={"lora_name": "x"}), 400)
        beams = {"model": "a1", "prompt": PROMPT, "max_tokens": 2, "use_beam_search": True, "n": 2}
        openai_error(http.post("/v1/completions", json=beams), 400, "use_beam_search")
        assert "x" not in {m["id"] for m in http.get("/v1/models").json()["data"]}
    assert _complete(openai_client(server), "a2") is not None  # the server goes on


def test_runtime_loading_needs_the_opt_in(setup, tmp_path):
    _, args, adapters = setup
    log = tmp_path / "server.log"
    with serving([*args, "--enable-lora"], log, {"PAGODA_API_KEY": API_KEY}) as (_, base), http_client(base) as http:
        response = http.post("/v1/load_lora_adapter", json={"lora_name": "a1", "lora_path": str(adapters["a1"])})
        assert response.status_code == 404
