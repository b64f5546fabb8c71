"""Encoder-only embedding models (BertModel, XLMRobertaModel) run natively: vectors equal
transformers' final hidden states pooled as the checkpoint's sentence-transformers files say (CLS
or mean, normalized or not), through LLM.embed (a batch of prompts of different lengths, token
ids) and POST /v1/embeddings with the openai client; a prompt longer than the position table is
refused by name, one that fills it runs; an encoder never generates; random (dummy) weights
take the checkpoint's shapes, whose bytes weight_bytes counts."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from pagoda import LLM
from pagoda.attention import get_attention_backend
from pagoda.config.engine_config import EngineConfig
from pagoda.config.resolve import resolve_config
from pagoda.loader.model_loader import build_model
from pagoda.loader.model_resolver import resolve_model
from pagoda.models import model_class
from tests.serving import MODEL, http_client, openai_client, openai_error, save_tokenizer, serving
from tests.test_embeddings import PROMPTS, assert_close, hf_embeddings, write_sentence_transformers_config

MAX_POSITIONS = 64  # BERT's position table; RoBERTa's holds padding_idx + 1 more rows

# name -> (config class, architecture, extra config)
ENCODERS = {
    "bert": (transformers.BertConfig, "BertModel", dict(max_position_embeddings=MAX_POSITIONS, type_vocab_size=2)),
    # Position ids from padding_idx + 1 = 2 on: its table has 2 rows more than a prompt can use.
    "xlm-roberta": (transformers.XLMRobertaConfig, "XLMRobertaModel", dict(
        max_position_embeddings=MAX_POSITIONS + 2, type_vocab_size=1, pad_token_id=1, hidden_act="gelu_new",
    )),
}


def save_tiny_encoder(
    name: str, directory: Path, pooling: str | None, normalize: bool, prefix: str = "", vocab_size: int = 256
) -> Path:
    """A random encoder in sentence-transformers' layout (pooling None: a bare transformers
    checkpoint); prefix: its tensors' names start with it (as in a checkpoint of the encoder with a head)."""
    config_cls, arch, extra = ENCODERS[name]
    config = config_cls(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        initializer_range=0.2, architectures=[arch], **extra,
    )
    torch.manual_seed(0)
    path = directory / name
    transformers.AutoModel.from_config(config).float().eval().save_pretrained(path)
    if prefix:
        weights = path / "model.safetensors"
        save_file({prefix + k: v for k, v in load_file(weights).items()}, weights, metadata={"format": "pt"})
    if pooling is not None:
        write_sentence_transformers_config(path, pooling, normalize)
    return path


@pytest.mark.parametrize("name,pooling,normalize,prefix", [
    ("bert", "CLS", False, ""),
    ("bert", "MEAN", True, "bert."),
    ("xlm-roberta", "MEAN", True, ""),
    ("xlm-roberta", "CLS", True, "roberta."),
])
def test_llm_embed_matches_transformers(tmp_path: Path, name: str, pooling: str, normalize: bool, prefix: str) -> None:
    # The reference: the same seed's model in transformers' own layout (it reads no prefix).
    want_path = save_tiny_encoder(name, tmp_path / "reference", pooling, normalize)
    path = save_tiny_encoder(name, tmp_path, pooling, normalize, prefix)
    full = list(range(3, 3 + MAX_POSITIONS))  # fills the position table
    prompts = PROMPTS + [full]
    # runner auto: an encoder embeds. max_num_seqs 3: steps of several prompts, and of one.
    llm = LLM(str(path), skip_tokenizer_init=True, max_num_seqs=3)
    outputs = llm.embed([{"prompt_token_ids": p} for p in prompts], use_tqdm=False)
    for output, prompt, want in zip(outputs, prompts, hf_embeddings(want_path, prompts, pooling, normalize)):
        assert output.prompt_token_ids == prompt
        assert_close(output.outputs.embedding, want)
    with pytest.raises(ValueError, match=f"the prompt has {MAX_POSITIONS + 1} tokens; the maximum model length is "
                                         f"{MAX_POSITIONS}"):
        llm.embed({"prompt_token_ids": full + [5]}, use_tqdm=False)
    # The engine goes on after the refusal.
    again = llm.embed({"prompt_token_ids": PROMPTS[1]}, use_tqdm=False)
    assert_close(again[0].outputs.embedding, hf_embeddings(want_path, [PROMPTS[1]], pooling, normalize)[0])


def test_encoder_without_sentence_transformers_files_embeds_its_cls_token_normalized(tmp_path: Path) -> None:
    path = save_tiny_encoder("bert", tmp_path, None, True)
    llm = LLM(str(path), skip_tokenizer_init=True, max_num_seqs=3)
    outputs = llm.embed([{"prompt_token_ids": p} for p in PROMPTS], use_tqdm=False)
    for output, want in zip(outputs, hf_embeddings(path, PROMPTS, "CLS", True)):
        assert_close(output.outputs.embedding, want)


@pytest.mark.parametrize("knob", [{"runner": "generate"}, {"task": "generate"}])
def test_encoder_refuses_to_generate(tmp_path: Path, knob: dict[str, str]) -> None:
    path = save_tiny_encoder("bert", tmp_path, "CLS", True)
    (name,) = knob
    with pytest.raises(ValueError, match=f"^{name}='generate' is invalid for BertModel: an encoder-only model"):
        LLM(str(path), skip_tokenizer_init=True, **knob)


def test_transformers_fallback_refuses_an_encoder(tmp_path: Path) -> None:
    path = save_tiny_encoder("bert", tmp_path, "CLS", True)
    with pytest.raises(ValueError, match="^model_impl='transformers' is invalid for BertModel"):
        LLM(str(path), skip_tokenizer_init=True, model_impl="transformers")


def test_max_model_len_past_roberta_positions_is_refused(tmp_path: Path) -> None:
    path = save_tiny_encoder("xlm-roberta", tmp_path, "CLS", True)
    with pytest.raises(ValueError, match=f"max_model_len={MAX_POSITIONS + 1} is larger than the model's maximum "
                                         f"context \\({MAX_POSITIONS}"):
        LLM(str(path), skip_tokenizer_init=True, max_model_len=MAX_POSITIONS + 1)


@pytest.mark.parametrize("name", sorted(ENCODERS))
def test_dummy_weights_and_weight_bytes(tmp_path: Path, name: str) -> None:
    path = save_tiny_encoder(name, tmp_path, "CLS", True)
    args = EngineConfig(model=str(path), load_format="dummy", device="cpu")
    model_config = resolve_config(args, resolve_model(str(path))).model
    cpu = torch.device("cpu")
    model = build_model(model_config, device=cpu, backend=get_attention_backend(cpu))
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    assert model_class(model_config.spec.architecture).weight_bytes(model_config.spec, torch.float32) == param_bytes
    assert model.kv_cache_spec(16) == []  # attention within the step: no KV cache


@pytest.fixture(scope="module")
def bert_server(tmp_path_factory: pytest.TempPathFactory):
    directory = tmp_path_factory.mktemp("bert")
    vocab_size = save_tokenizer(directory / "bert")
    path = save_tiny_encoder("bert", directory, "MEAN", True, vocab_size=vocab_size)
    # No --runner: auto picks pooling for an encoder, as vLLM's does.
    with serving([str(path), "--served-model-name", MODEL], directory / "server.log") as (_, base):
        yield path, base


def test_embeddings_endpoint_matches_transformers(bert_server) -> None:
    path, base = bert_server
    client = openai_client(base)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    texts = ["hello", "a longer sentence to embed, with more tokens in it", "x"]
    ids = [tokenizer.encode(t) for t in texts]
    want = hf_embeddings(path, ids, "MEAN", True)
    by_text = client.embeddings.create(model=MODEL, input=texts, encoding_format="float")
    by_ids = client.embeddings.create(model=MODEL, input=ids)  # base64, decoded by the client
    assert by_text.usage.prompt_tokens == sum(map(len, ids))
    for t, i, w in zip(by_text.data, by_ids.data, want):
        assert_close(t.embedding, w)
        assert_close(i.embedding, w)


def test_too_long_input_is_a_400_naming_input(bert_server) -> None:
    _, base = bert_server
    with http_client(base) as http:
        too_long = http.post("/v1/embeddings", json={"model": MODEL, "input": [[5] * (MAX_POSITIONS + 1)]})
        error = openai_error(too_long, 400, "input")
        assert f"maximum model length is {MAX_POSITIONS}" in error["message"]
        ok = http.post("/v1/embeddings", json={"model": MODEL, "input": [[5] * MAX_POSITIONS]})
        assert ok.status_code == 200 and len(ok.json()["data"][0]["embedding"]) == 64


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", sorted(ENCODERS))
def test_gpu_bf16_embeddings_match_transformers(tmp_path: Path, name: str) -> None:
    path = save_tiny_encoder(name, tmp_path, "MEAN", True)
    prompts = PROMPTS + [list(range(3, 3 + MAX_POSITIONS))]
    llm = LLM(str(path), device="cuda", dtype="bfloat16", skip_tokenizer_init=True, max_num_seqs=3)
    outputs = llm.embed([{"prompt_token_ids": p} for p in prompts], use_tqdm=False)
    hf = transformers.AutoModel.from_pretrained(path, dtype=torch.bfloat16).cuda().eval()
    with torch.no_grad():
        for output, prompt in zip(outputs, prompts):
            hidden = hf(torch.tensor([prompt], device="cuda")).last_hidden_state[0].float().mean(dim=0)
            want = torch.nn.functional.normalize(hidden, dim=0).cpu()
            torch.testing.assert_close(torch.tensor(output.outputs.embedding), want, atol=2e-2, rtol=0)
