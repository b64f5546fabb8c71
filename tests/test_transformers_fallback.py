"""The transformers fallback (--model-impl): architectures with no native Pagoda code run through
transformers' modeling code with Pagoda's paged attention, greedy tokens equal to transformers'
own generate (fp32, CPU) with batching, chunked prefill and the prefix cache; served by
`pagoda serve`; model_impl pagoda/transformers forced either way."""

from __future__ import annotations

import logging
import random

import pytest
import torch
import transformers

from pagoda import LLM, SamplingParams
from tests.serving import MODEL, openai_client, save_tokenizer, serving
from tests.tiny_models import hf_greedy, save_tiny_model

MAX_NEW = 10
_COMMON = {"vocab_size": 256, "max_position_embeddings": 256, "eos_token_id": 1, "bos_token_id": 0, "pad_token_id": 0}

# Architectures Pagoda has no native class for: learned absolute positions with a tied head
# (GPT-2), OPT's offset positions and its projected embeddings, GPT-NeoX's partial rotary and
# parallel residual with an untied head.
FALLBACK_MODELS = {
    "gpt2": transformers.GPT2Config(
        n_embd=64, n_layer=2, n_head=4, n_positions=256, initializer_range=0.2, **_COMMON,
    ),
    "opt": transformers.OPTConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, ffn_dim=128, word_embed_proj_dim=32,
        init_std=0.2, **_COMMON,
    ),
    "gpt_neox": transformers.GPTNeoXConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        rotary_pct=0.5, use_parallel_residual=True, tie_word_embeddings=False, initializer_range=0.2, **_COMMON,
    ),
}


def _save(name: str, directory, **overrides):
    config = FALLBACK_MODELS[name].__class__(**{**FALLBACK_MODELS[name].to_dict(), **overrides})
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).float().eval()
    path = directory / name
    model.save_pretrained(path)
    return path


def _prompts() -> list[list[int]]:
    rng = random.Random(1)
    return [[rng.randrange(2, 256) for _ in range(n)] for n in (3, 70, 17, 41, 5)]


def _greedy(llm: LLM, prompts: list[list[int]]) -> list[list[int]]:
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outputs]


@pytest.mark.parametrize("name", sorted(FALLBACK_MODELS))
def test_fallback_matches_transformers_with_chunked_prefill(name, tmp_path, caplog):
    path = _save(name, tmp_path)
    prompts = _prompts()
    expected = hf_greedy(path, prompts, MAX_NEW)
    # 16 tokens a step and 4-token blocks: the long prompts prefill in chunks beside the short
    # ones' decodes, over many blocks; the repeated first prompt hits the prefix cache.
    with caplog.at_level(logging.INFO, logger="pagoda"):
        llm = LLM(model=str(path), device="cpu", skip_tokenizer_init=True, max_num_batched_tokens=16, block_size=4)
    assert "model implementation: transformers" in caplog.text
    assert _greedy(llm, prompts) == expected
    assert _greedy(llm, prompts[1:2]) == expected[1:2]


def test_fallback_served_answers_a_completion(tmp_path):
    vocab_size = save_tokenizer(tmp_path / "tokenizer")
    path = _save("gpt2", tmp_path, vocab_size=vocab_size)
    save_tokenizer(path)
    prompt = "Hello there"
    prompt_ids = transformers.AutoTokenizer.from_pretrained(path)(prompt)["input_ids"]
    expected = hf_greedy(path, [prompt_ids], 6)[0]
    with serving([str(path), "--served-model-name", MODEL, "--api-key", "test-key"], tmp_path / "log") as (_, base):
        client = openai_client(base)
        done = client.completions.create(
            model=MODEL, prompt=prompt, max_tokens=6, temperature=0.0, extra_body={"ignore_eos": True,
                                                                                  "return_token_ids": True},
        )
    log = (tmp_path / "log").read_text()
    assert "model implementation: transformers" in log
    assert done.choices[0].finish_reason == "length"
    assert done.usage.completion_tokens == 6
    assert done.choices[0].token_ids == expected


def test_model_impl_pagoda_on_a_fallback_architecture_names_the_native_ones(tmp_path):
    path = _save("gpt2", tmp_path)
    with pytest.raises(ValueError, match=r"GPT2LMHeadModel.*no native Pagoda implementation.*LlamaForCausalLM"):
        LLM(model=str(path), device="cpu", skip_tokenizer_init=True, model_impl="pagoda")


def test_model_impl_transformers_runs_a_native_architecture(tmp_path, caplog):
    path = save_tiny_model("qwen3", tmp_path)
    prompts = _prompts()
    expected = hf_greedy(path, prompts, MAX_NEW)
    with caplog.at_level(logging.INFO, logger="pagoda"):
        llm = LLM(model=str(path), device="cpu", skip_tokenizer_init=True, model_impl="transformers",
                  max_num_batched_tokens=16, block_size=4)
    assert "model implementation: transformers (Qwen3ForCausalLM" in caplog.text
    assert _greedy(llm, prompts) == expected


def test_an_architecture_neither_native_nor_loadable_lists_the_native_ones(tmp_path):
    # Falcon's transformers code computes attention itself, never through the attention interface.
    config = transformers.FalconConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, vocab_size=64)
    config.architectures = ["FalconForCausalLM"]
    config.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"FalconForCausalLM.*attention interface.*natively supported: .*Qwen3"):
        LLM(model=str(tmp_path), device="cpu", skip_tokenizer_init=True)


def test_tensor_parallel_fallback_is_refused(tmp_path):
    path = _save("opt", tmp_path)
    with pytest.raises(ValueError, match=r"tensor_parallel_size=2.*transformers fallback runs on one rank"):
        LLM(model=str(path), device="cpu", skip_tokenizer_init=True, tensor_parallel_size=2)
