"""Phi-3 and Gemma 2/3 against transformers (fp32, CPU, tiny random models) where the
every-architecture tests do not reach: Gemma prompts several windows long in one batch with short
ones, chunked, with a window that is not a multiple of the block size; Phi-3 requests past
LongRoPE's pretraining length (long factors) batched with requests within it (short factors);
and the Triton kernel's sliding window and soft-cap against the torch reference."""

from __future__ import annotations

import random

import pytest
import torch

from pagoda import LLM, SamplingParams
from tests.kernel_device import KERNELS_RUN, NO_KERNELS
from tests.tiny_models import hf_greedy, save_tiny_model

MAX_NEW = 10


def _greedy(path, prompts: list[list[int]], **engine) -> tuple[list[list[int]], LLM]:
    llm = LLM(model=str(path), device="cpu", skip_tokenizer_init=True, **engine)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outputs], llm


def _prompts(*lengths: int) -> list[list[int]]:
    rng = random.Random(7)
    return [[rng.randrange(2, 256) for _ in range(n)] for n in lengths]


@pytest.mark.parametrize(("arch", "window"), [("gemma2", 13), ("gemma3", 16)])
def test_gemma_prompts_longer_than_the_window_batched_with_short_ones(arch, window, tmp_path):
    path = save_tiny_model(arch, tmp_path, sliding_window=window)
    # 100 tokens: several windows; 9: a decode that crosses the window; 4: within it throughout.
    prompts = _prompts(100, 9, 4, 37)
    expected = hf_greedy(path, prompts, MAX_NEW)
    # Chunks of 8 tokens mix prefill chunks over a cached prefix with decodes in every step.
    got, llm = _greedy(path, prompts, max_num_batched_tokens=8, block_size=4, enable_chunked_prefill=True)
    assert got == expected
    # The whole context is served: max_model_len is no longer capped to the window.
    assert llm.llm_engine.processor.config.model.max_model_len == 512


def test_phi3_long_and_short_rope_requests_in_one_batch(tmp_path):
    # Pretraining length 32: the 40- and 70-token prompts are rotated with the long factors from
    # their first token, as transformers does; the 8-token one stays within 32 with its output.
    path = save_tiny_model("phi3", tmp_path, original_max_position_embeddings=32)
    prompts = _prompts(40, 8, 70)
    got, _ = _greedy(path, prompts)
    assert got == hf_greedy(path, prompts, MAX_NEW)


@pytest.mark.skipif(not KERNELS_RUN, reason=NO_KERNELS)
@pytest.mark.parametrize(("window", "soft_cap"), [(5, None), (None, 2.0), (20, 3.0)])
@pytest.mark.parametrize(
    ("query_lens", "prefix_lens", "num_splits"),
    [
        ([1, 7, 20, 1], [33, 40, 0, 3], 1),  # decodes, a chunk over a prefix longer than the window, a prompt
        ([1, 1, 1], [2, 45, 90], 3),  # decodes whose keys are split across programs
    ],
)
def test_triton_window_and_soft_cap_match_torch_reference(
    window, soft_cap, query_lens, prefix_lens, num_splits, monkeypatch
):
    from pagoda.attention import triton_backend
    from pagoda.attention.torch_backend import TorchAttentionBackend
    from tests.test_triton_attention import DEVICE, DTYPES, _batch

    monkeypatch.setattr(triton_backend, "decode_splits", lambda *args: num_splits)
    dtype = DTYPES[-1]  # float32 in the interpreter, bfloat16 on a GPU
    q, k, v, cache, metadata = _batch(query_lens, prefix_lens, 4, 2, 16, 16, dtype, seed=3)
    outs = []
    for backend in (TorchAttentionBackend(), triton_backend.TritonAttentionBackend()):
        metadata.backend_data = {}
        backend.prepare(metadata)
        outs.append(backend.forward(
            q, k, v, cache.clone(), metadata, 0.3, sliding_window=window, logits_soft_cap=soft_cap
        ))
    reference, out = outs
    plain = TorchAttentionBackend()
    metadata.backend_data = {}
    plain.prepare(metadata)
    unmasked = plain.forward(q, k, v, cache.clone(), metadata, 0.3)
    assert not torch.allclose(reference, unmasked, atol=1e-3)  # the window and cap change the output
    assert out.device.type == DEVICE and not out.isnan().any()
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    assert (out.float() - reference.float()).norm() / reference.float().norm() < tol
