"""Embedding models (--runner pooling): vectors equal transformers' final hidden states pooled as
the model's sentence-transformers config says (last token normalized without one), through
LLM.embed and POST /v1/embeddings (the openai client: base64 and float), and bad input refused
by name while the server goes on."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from fastapi.testclient import TestClient

from pagoda import LLM, PoolingParams
from pagoda.entrypoints.openai.server import build_app
from pagoda.entrypoints.openai.serving_engine import ServerConfig
from pagoda.pooling import read_pooler_config
from tests.serving import MODEL, http_client, openai_client, openai_error, save_tokenizer, serving
from tests.test_server_endpoints import HeldEngine
from tests.tiny_models import save_tiny_model

# Mixed lengths, one of a single token: each is its own pooled row range in one batch.
PROMPTS = [[5, 6, 7], list(range(10, 70)), [9], list(range(100, 120))]


def hf_embeddings(path: Path, prompts: list[list[int]], pooling: str, normalize: bool) -> list[torch.Tensor]:
    """transformers' final hidden states of each prompt, pooled as sentence-transformers would."""
    model = transformers.AutoModel.from_pretrained(path, dtype=torch.float32).eval()
    vectors = []
    with torch.no_grad():
        for prompt in prompts:
            hidden = model(torch.tensor([prompt])).last_hidden_state[0]
            vector = {"LAST": hidden[-1], "MEAN": hidden.mean(dim=0), "CLS": hidden[0]}[pooling]
            vectors.append(torch.nn.functional.normalize(vector, dim=0) if normalize else vector)
    return vectors


def write_sentence_transformers_config(path: Path, pooling: str, normalize: bool) -> None:
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
    (path / "modules.json").write_text(json.dumps(modules))
    (path / "1_Pooling").mkdir()
    modes = {"LAST": "pooling_mode_lasttoken", "MEAN": "pooling_mode_mean_tokens", "CLS": "pooling_mode_cls_token"}
    config = {mode: mode == modes[pooling] for mode in modes.values()}
    config.update(word_embedding_dimension=64, pooling_mode_max_tokens=False, include_prompt=True)
    (path / "1_Pooling" / "config.json").write_text(json.dumps(config))


def assert_close(got: list[float], want: torch.Tensor) -> None:
    torch.testing.assert_close(torch.tensor(got), want, atol=2e-5, rtol=1e-4)


def test_llm_embed_defaults_to_last_token_normalized(tmp_path: Path) -> None:
    path = save_tiny_model("qwen3", tmp_path)
    llm = LLM(str(path), task="embed", skip_tokenizer_init=True, max_model_len=256)
    outputs = llm.embed([{"prompt_token_ids": p} for p in PROMPTS], use_tqdm=False)
    for output, prompt, want in zip(outputs, PROMPTS, hf_embeddings(path, PROMPTS, "LAST", True)):
        assert output.prompt_token_ids == prompt
        assert_close(output.outputs.embedding, want)
    # Not a Matryoshka model: its vectors cannot be cut; and it generates nothing.
    with pytest.raises(ValueError, match="^dimensions=8"):
        llm.embed({"prompt_token_ids": [1, 2]}, PoolingParams(dimensions=8), use_tqdm=False)
    with pytest.raises(ValueError, match="runner='pooling'"):
        llm.generate({"prompt_token_ids": [1, 2]})


@pytest.mark.parametrize("pooling,normalize", [("MEAN", True), ("CLS", False)])
def test_sentence_transformers_pooling(tmp_path: Path, pooling: str, normalize: bool) -> None:
    path = save_tiny_model("llama3", tmp_path)
    write_sentence_transformers_config(path, pooling, normalize)
    llm = LLM(str(path), runner="pooling", skip_tokenizer_init=True, max_model_len=256, max_num_seqs=3)
    outputs = llm.embed([{"prompt_token_ids": p} for p in PROMPTS], use_tqdm=False)
    for output, want in zip(outputs, hf_embeddings(path, PROMPTS, pooling, normalize)):
        assert_close(output.outputs.embedding, want)


def test_unsupported_sentence_transformers_modules_are_named(tmp_path: Path) -> None:
    write_sentence_transformers_config(tmp_path, "MEAN", True)
    modules = json.loads((tmp_path / "modules.json").read_text())
    modules.append({"idx": 3, "name": "3", "path": "3_Dense", "type": "sentence_transformers.models.Dense"})
    (tmp_path / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(ValueError, match="Dense"):
        read_pooler_config(tmp_path, transformers.LlamaConfig())


def test_generating_llm_refuses_embed(tmp_path: Path) -> None:
    llm = LLM(str(save_tiny_model("qwen3", tmp_path)), skip_tokenizer_init=True, max_model_len=64)
    with pytest.raises(ValueError, match="runner='generate'"):
        llm.embed({"prompt_token_ids": [1, 2]})


@pytest.fixture(scope="module")
def embedding_server(tmp_path_factory: pytest.TempPathFactory):
    directory = tmp_path_factory.mktemp("embed")
    vocab_size = save_tokenizer(directory / "qwen3")
    path = save_tiny_model("qwen3", directory, vocab_size=vocab_size, matryoshka_dimensions=[16, 32])
    args = [str(path), "--served-model-name", MODEL, "--runner", "pooling", "--max-model-len", "128"]
    with serving(args, directory / "server.log") as (_, base):
        yield path, base


def test_embeddings_endpoint_matches_transformers(embedding_server) -> None:
    path, base = embedding_server
    client = openai_client(base)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    texts = ["hello", "a longer sentence to embed, with more tokens in it", "x"]
    ids = [tokenizer.encode(t) for t in texts]
    want = hf_embeddings(path, ids, "LAST", True)
    as_base64 = client.embeddings.create(model=MODEL, input=texts)  # the client asks for base64 and decodes it
    as_float = client.embeddings.create(model=MODEL, input=texts, encoding_format="float")
    assert as_base64.usage.prompt_tokens == sum(map(len, ids))
    for b, f, w in zip(as_base64.data, as_float.data, want):
        assert_close(b.embedding, w)
        assert_close(f.embedding, w)
    assert [d.index for d in as_float.data] == [0, 1, 2]
    # One prompt alone runs the same step each time: both encodings carry the same float32s.
    one = client.embeddings.create(model=MODEL, input="hello", encoding_format="float")
    one_base64 = client.embeddings.create(model=MODEL, input="hello", encoding_format="base64")
    # (Asked for explicitly, the client hands base64 back as it came.)
    decoded = np.frombuffer(base64.b64decode(one_base64.data[0].embedding), dtype="<f4").tolist()
    assert decoded == one.data[0].embedding
    assert_close(one.data[0].embedding, want[0])
    by_ids = client.embeddings.create(model=MODEL, input=ids, encoding_format="float")
    single = client.embeddings.create(model=MODEL, input=ids[1], encoding_format="float")
    assert_close(by_ids.data[2].embedding, want[2])
    assert_close(single.data[0].embedding, want[1])
    # Matryoshka: the first `dimensions` values, normalized again.
    short = client.embeddings.create(model=MODEL, input=ids[1], dimensions=16, encoding_format="float")
    hidden = transformers.AutoModel.from_pretrained(path).eval()(torch.tensor([ids[1]])).last_hidden_state[0, -1]
    assert_close(short.data[0].embedding, torch.nn.functional.normalize(hidden[:16].detach(), dim=0))


@pytest.mark.parametrize("body,param", [
    ({"input": "hi", "encoding_format": "hex"}, "encoding_format"),
    ({"input": "hi", "dimensions": 20}, "dimensions"),  # the model's sizes are 16 and 32
    ({"input": []}, "input"),
    ({"input": [[3, 10**6]]}, "input"),  # outside the vocabulary
    ({"input": [[5] * 200]}, "input"),  # past max_model_len
    ({}, "input"),
])
def test_bad_embedding_requests_name_the_field(embedding_server, body: dict, param: str) -> None:
    _, base = embedding_server
    with http_client(base) as http:
        openai_error(http.post("/v1/embeddings", json={"model": MODEL, **body}), 400, param)
        ok = http.post("/v1/embeddings", json={"model": MODEL, "input": [[5, 6]]})
        assert ok.status_code == 200 and len(ok.json()["data"][0]["embedding"]) == 64


def test_embedding_server_generates_nothing(embedding_server) -> None:
    _, base = embedding_server
    with http_client(base) as http:
        openai_error(http.post("/v1/completions", json={"model": MODEL, "prompt": "hi"}), 400, "model")
        assert http.get("/health").status_code == 200


def test_generating_server_refuses_embeddings() -> None:
    app = TestClient(build_app(HeldEngine(), ServerConfig([MODEL], 64, None, False)))
    openai_error(app.post("/v1/embeddings", json={"model": MODEL, "input": [[1, 2]]}), 400, "model")
