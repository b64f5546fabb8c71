"""Greedy outputs equal transformers' token for token (fp32, CPU) on tiny random models of every
supported architecture: plain batches, chunked prefill, preemption, and a warm prefix cache."""

from __future__ import annotations

import random

import pytest
import torch

from pagoda import LLM, SamplingParams
from tests.tiny_models import ARCHITECTURES, hf_greedy, hf_logits, save_tiny_model

MAX_NEW = 12


@pytest.fixture(scope="module", params=sorted(ARCHITECTURES))
def tiny_model(request, tmp_path_factory):
    path = save_tiny_model(request.param, tmp_path_factory.mktemp("models"))
    rng = random.Random(1)
    prompts = [[rng.randrange(2, 256) for _ in range(n)] for n in (3, 17, 40, 9, 64)]
    return path, prompts, hf_greedy(path, prompts, MAX_NEW)


def _greedy(llm: LLM, prompts: list[list[int]]) -> list[list[int]]:
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outputs]


def _llm(path, **kwargs) -> LLM:
    return LLM(model=str(path), device="cpu", skip_tokenizer_init=True, **kwargs)


def test_batch_matches_transformers(tiny_model):
    path, prompts, expected = tiny_model
    assert _greedy(_llm(path), prompts) == expected


def test_chunked_prefill_matches_transformers(tiny_model):
    path, prompts, expected = tiny_model
    # A budget of 8 tokens a step splits every longer prompt into chunks mixed with decodes.
    llm = _llm(path, max_num_batched_tokens=8, block_size=4)
    assert _greedy(llm, prompts) == expected


def test_preemption_matches_transformers(tiny_model):
    path, prompts, expected = tiny_model
    # 24 blocks of 4 tokens: the 64-token prompt alone needs 19 with its output, so requests
    # running together run out of blocks and the newest are preempted and recomputed.
    llm = _llm(path, num_gpu_blocks_override=24, block_size=4, max_model_len=96)
    assert _greedy(llm, prompts) == expected
    assert llm.llm_engine.engine_core.engine_core.scheduler.num_preemptions > 0


def test_warm_prefix_cache_matches_transformers(tiny_model):
    path, prompts, expected = tiny_model
    llm = _llm(path, block_size=4)
    assert _greedy(llm, prompts) == expected
    kv = llm.llm_engine.engine_core.engine_core.scheduler.kv_cache_manager
    hits_before = kv.prefix_cache_hits
    assert _greedy(llm, prompts) == expected
    assert kv.prefix_cache_hits > hits_before


def test_prompt_logprobs_equal_reference_log_softmax(tiny_model):
    path, prompts, _ = tiny_model
    prompt = prompts[2]
    reference = torch.log_softmax(hf_logits(path, prompt), dim=-1)
    llm = _llm(path, max_num_batched_tokens=16)  # chunked, so logprobs span several steps
    params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=2, logprobs=3)
    out = llm.generate({"prompt_token_ids": prompt}, params, use_tqdm=False)[0]
    assert out.prompt_logprobs[0] is None
    assert len(out.prompt_logprobs) == len(prompt)
    for i, position in enumerate(out.prompt_logprobs[1:], start=1):
        got = position[prompt[i]].logprob
        assert got == pytest.approx(reference[i - 1, prompt[i]].item(), abs=1e-4)
    sampled = out.outputs[0].token_ids[0]
    assert sampled == int(reference[-1].argmax())
    assert out.outputs[0].logprobs[0][sampled].logprob == pytest.approx(reference[-1].max().item(), abs=1e-4)
