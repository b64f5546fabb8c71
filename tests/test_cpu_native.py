"""The CPU's decode attention in C (pagoda/kernels/cpu_native.py) against torch's ops: the same keys
and values written, the same outputs within float32 rounding, the same greedy tokens; and torch's ops
where no compiler builds it."""

from __future__ import annotations

import pytest
import torch
from test_triton_attention import _batch, _run

from pagoda import LLM, SamplingParams
from pagoda.attention.torch_backend import TorchAttentionBackend
from pagoda.kernels import cpu_native
from tests.tiny_models import save_tiny_model

needs_compiler = pytest.mark.skipif(cpu_native.load() is None, reason="no C compiler builds the CPU kernels here")


@needs_compiler
@pytest.mark.parametrize("num_heads, num_kv_heads, head_dim, block_size", [(9, 3, 64, 16), (4, 4, 32, 16), (8, 1, 128, 32)])
@pytest.mark.parametrize("prefix_lens", [[5], [0, 17, 40, 300], [15, 16, 31, 32, 33] * 4])
def test_native_decodes_equal_torch_reference(num_heads, num_kv_heads, head_dim, block_size, prefix_lens):
    inputs = _batch([1] * len(prefix_lens), prefix_lens, num_heads, num_kv_heads, head_dim, block_size,
                    torch.float32, seed=len(prefix_lens))
    ref, ref_cache = _run(TorchAttentionBackend(), *inputs)
    out, cache = _run(TorchAttentionBackend(native_decode=True), *inputs)
    assert inputs[-1].backend_data["decode"].native is not None  # the C function ran
    assert torch.equal(cache, ref_cache)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@needs_compiler
def test_greedy_tokens_are_the_same_through_the_c_decode(tmp_path, monkeypatch):
    llm = LLM(model=str(save_tiny_model("llama3", tmp_path)), device="cpu", skip_tokenizer_init=True, max_model_len=256)
    prompts = [{"prompt_token_ids": [3 + (7 * k + j) % 200 for j in range(5 + 9 * k)]} for k in range(6)]
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)

    def tokens():
        return [out.outputs[0].token_ids for out in llm.generate(prompts, params, use_tqdm=False)]

    native = tokens()
    monkeypatch.setattr(cpu_native, "load", lambda: None)
    assert native == tokens()


def _load_afresh():
    cpu_native.load.cache_clear()
    try:
        return cpu_native.load()
    finally:
        cpu_native.load.cache_clear()  # the next caller builds or finds the real one


@pytest.mark.parametrize("compiler, cache", [("no-such-cc", "tmp"), ("false", "tmp"), ("cc", "/proc/no-cache-here")])
def test_where_it_does_not_build_torch_ops_attend(compiler, cache, tmp_path, monkeypatch, caplog):
    """A compiler that is not there or fails, or a cache that cannot be written: a warning, and torch's ops."""
    monkeypatch.setenv("PAGODA_CACHE_DIR", str(tmp_path) if cache == "tmp" else cache)
    monkeypatch.setenv("CC", str(tmp_path / compiler) if compiler == "no-such-cc" else compiler)
    assert _load_afresh() is None
    assert "not built" in caplog.text
    inputs = _batch([1, 1], [4, 20], 4, 2, 32, 16, torch.float32, seed=0)
    monkeypatch.setattr(cpu_native, "load", lambda: None)
    _run(TorchAttentionBackend(native_decode=True), *inputs)
    assert inputs[-1].backend_data["decode"].native is None
