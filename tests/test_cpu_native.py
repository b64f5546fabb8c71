"""The CPU kernels in C (pagoda/kernels/cpu_native.py). The decode attention against torch's ops: the
same keys and values written, the same outputs within float32 rounding, the same greedy tokens; and
torch's ops where no compiler builds it. The int4 matmul against its arithmetic in torch (int16
activations per 32 inputs) and the exact product, in the engine's layers eagerly and compiled, and
torch's int4 kernel where it cannot run. The Q8_0 matmul (the LM head's screen) against its arithmetic.
The decoder layers' RMSNorm, rotary embedding and SiLU-and-mul against their torch paths."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_triton_attention import _batch, _run

from pagoda import LLM, SamplingParams
from pagoda.attention.torch_backend import TorchAttentionBackend
from pagoda.kernels import cpu_native
from pagoda.layers.activation import SiluAndMul
from pagoda.layers.norm import GemmaRMSNorm, RMSNorm
from pagoda.layers.q8_rows import Q8Rows
from pagoda.layers.rotary import RotaryEmbedding
from pagoda.quantization.int4pack import Int4Pack, NativeInt4, int4_weight
from tests.test_quant_w4a16_model import write_quantized
from tests.tiny_models import save_tiny_model

needs_compiler = pytest.mark.skipif(cpu_native.load() is None, reason="no C compiler builds the CPU kernels here")
needs_int_matmuls = pytest.mark.skipif(
    not cpu_native.int_matmuls_available(), reason="the C int4 and Q8_0 matmuls need AVX512-VNNI or AVX2"
)


@needs_compiler
@pytest.mark.parametrize("num_heads, num_kv_heads, head_dim, block_size", [(9, 3, 64, 16), (4, 4, 32, 16), (8, 1, 128, 32)])
@pytest.mark.parametrize("prefix_lens", [[5], [0, 17, 40, 300], [15, 16, 31, 32, 33] * 4, [255, 256, 1000]])
def test_native_decodes_equal_torch_reference(num_heads, num_kv_heads, head_dim, block_size, prefix_lens):
    inputs = _batch([1] * len(prefix_lens), prefix_lens, num_heads, num_kv_heads, head_dim, block_size,
                    torch.float32, seed=len(prefix_lens))
    ref, ref_cache = _run(TorchAttentionBackend(), *inputs)
    out, cache = _run(TorchAttentionBackend(native_decode=True), *inputs)
    assert inputs[-1].backend_data["decode"].native is not None  # the C function ran
    assert torch.equal(cache, ref_cache)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@needs_compiler
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("prefix_lens, head_dim", [([5], 64), ([0, 17, 40, 300], 64), ([700], 64), ([3, 90], 128),
                                                   ([3, 90], 36)])  # 36: past the last full vector of 8
def test_native_decodes_of_a_16_bit_pool_equal_torch_reference(dtype, prefix_lens, head_dim, monkeypatch):
    """--kv-cache-dtype bfloat16 / float16 on a float32 model: the same bytes written (converted as
    torch converts them), the same outputs within float32 rounding."""
    if not cpu_native.decode_attends(cpu_native.load(), dtype):
        pytest.skip(f"the C compiler here has no {dtype}")
    q, k, v, cache, metadata = _batch([1] * len(prefix_lens), prefix_lens, 9, 3, head_dim, 16, torch.float32,
                                      seed=len(prefix_lens))
    inputs = (q, k, v, cache.to(dtype), metadata)
    ref, ref_cache = _run(TorchAttentionBackend(), *inputs)
    native, calls = cpu_native.decode_attention, []

    def spy(*args):
        calls.append(1)
        return native(*args)

    monkeypatch.setattr(cpu_native, "decode_attention", spy)
    out, cache = _run(TorchAttentionBackend(native_decode=True), *inputs)
    assert calls  # the C function ran
    assert torch.equal(cache.view(torch.int16), ref_cache.view(torch.int16))
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


def _int4_reference(x: torch.Tensor, q: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """The C matmul's arithmetic in torch: each 32 inputs of a row rounded to steps of max|x| / levels
    (int16 or int8, as the CPU's kernel takes them), times d * q, plus m times the block's float sum;
    d and m in float16."""
    rows, k = x.shape
    levels = cpu_native.int4_activation_levels()
    blocks = x.reshape(rows, k // 32, 32)
    amax = blocks.abs().amax(dim=2, keepdim=True)
    # levels / amax divides as C does (a Python number over a tensor multiplies by its reciprocal)
    inverse = torch.full_like(amax, levels).div(amax)
    steps = torch.round(blocks * torch.where(amax > 0, inverse, torch.zeros_like(amax))) * (amax / levels)
    per_input = torch.arange(k) // 32
    d, m = d.half().float(), m.half().float()
    return steps.reshape(rows, k) @ (d[:, per_input] * q.float()).t() + blocks.sum(dim=2) @ m.t()


@needs_int_matmuls
@pytest.mark.parametrize("n, k", [(16, 32), (960, 576), (576, 1536)])
def test_int4_matmul_equals_its_arithmetic_in_torch(n, k, int4_activations):
    g = torch.Generator().manual_seed(n)
    q = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
    d = torch.rand(n, k // 32, generator=g) * 0.02 + 1e-3
    m = (torch.rand(n, k // 32, generator=g) - 0.5) * 0.1
    w = cpu_native.int4_pack(q, d, m)
    per_input = torch.arange(k) // 32
    exact_weight = d.half().float()[:, per_input] * q.float() + m.half().float()[:, per_input]
    assert cpu_native.int4_matmul(torch.empty(0, k), w, n).shape == (0, n)
    for rows in (1, 3, 4, 13, 16, 70):  # the kernel's row chunks of 8, 4 and 1
        x = torch.randn(rows, k, generator=g)
        x[0, :32] = 0  # a block of zeros (no scale),
        x[-1, -5] = 300.0  # and one with an outlier
        got = cpu_native.int4_matmul(x, w, n)
        want = _int4_reference(x, q, d, m)
        assert ((got - want).norm() / want.norm()).item() < 1e-5, rows
        exact = x @ exact_weight.t()  # int16 steps: far inside bfloat16's 2**-9; int8: within ~1 %
        assert ((got - exact).norm() / exact.norm()).item() < 3.3 / cpu_native.int4_activation_levels(), rows


@needs_int_matmuls
def test_int4_activations_are_int8_or_int16(monkeypatch):
    """PAGODA_CPU_INT4_ACTIVATIONS: int16 everywhere, int8 where the CPU has the kernel (AVX2 without
    VNNI); anything else is an error that names the variable."""
    with pytest.raises(ValueError, match="PAGODA_CPU_INT4_ACTIVATIONS='int4'"):
        cpu_native.set_int4_activations("int4")
    monkeypatch.setenv("PAGODA_CPU_INT4_ACTIVATIONS", "int16")
    assert _load_afresh() is not None and cpu_native.int4_activation_levels() == 32767
    monkeypatch.setenv("PAGODA_CPU_INT4_ACTIVATIONS", "int4")
    with pytest.raises(ValueError, match="int8 or int16"):
        _load_afresh()
    monkeypatch.delenv("PAGODA_CPU_INT4_ACTIVATIONS")
    assert _load_afresh() is not None
    flags = set(Path("/proc/cpuinfo").read_text().split())
    vnni = {"avx512f", "avx512bw", "avx512_vnni"} <= flags
    assert cpu_native.int4_activation_levels() == (32767 if vnni else 127)  # by default int8 where it runs


@needs_int_matmuls
def test_int4_layers_run_in_c_eagerly_and_compiled(tmp_path, monkeypatch):
    """An AWQ model's layers through the C matmul, with the same greedy tokens eagerly and in the
    compiled decode forward (one graph: the op is opaque to the compiler). Gemma 2: its norms keep
    its layers from the whole-layer C call (tests/test_cpu_decode_layer.py), so -O3 compiles."""
    monkeypatch.setenv("PAGODA_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    model = write_quantized(save_tiny_model("gemma2", tmp_path), tmp_path / "awq", "awq", 32)
    prompts = [{"prompt_token_ids": [3 + (5 * k + j) % 200 for j in range(4 + 7 * k)]} for k in range(3)]
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    tokens = []
    for level in (0, 3):
        llm = LLM(model=str(model), device="cpu", skip_tokenizer_init=True, max_model_len=64, optimization_level=level)
        runner = llm.llm_engine.engine_core.engine_core.executor.worker.runner
        assert isinstance(runner.model.model.layers[0].mlp.down_proj.int4, NativeInt4)
        tokens.append([out.outputs[0].token_ids for out in llm.generate(prompts, params, use_tqdm=False)])
        assert (runner.compiled_decode is not None) == (level == 3)  # still: no step fell back to eager
    assert tokens[0] == tokens[1]


@needs_int_matmuls
def test_q8_matmul_equals_its_arithmetic_in_torch():
    g = torch.Generator().manual_seed(0)
    values = torch.randint(-127, 128, (1000, 576), generator=g, dtype=torch.int8)
    scales = torch.rand(1000, 18, generator=g) * 1e-3
    weight = (values.float().unflatten(1, (-1, 32)) * scales[..., None]).flatten(1)
    held = Q8Rows(values, scales)  # in blocks of 16 rows (1,000: the last block padded)

    def q8_matmul(x):
        return cpu_native.q8_matmul(x, held.blocks, held.block_scales, held.num_rows)

    assert q8_matmul(torch.empty(0, 576)).shape == (0, 1000)
    for rows in (1, 3, 4, 13, 16, 70):  # the kernel's row chunks of 8, 4 and 1
        x = torch.randn(rows, 576, generator=g)
        x[-1, 7] = -250.0  # an outlier sets its row's step
        amax = x.abs().amax(dim=1, keepdim=True)
        steps = torch.round(x * (32767.0 / amax)) * (amax / 32767.0)  # each row in int16 steps
        got, want = q8_matmul(x), steps @ weight.t()
        assert ((got - want).norm() / want.norm()).item() < 1e-5, rows


def test_without_the_c_matmul_torchs_int4_kernel_runs(monkeypatch):
    monkeypatch.setattr(cpu_native, "int_matmuls_available", lambda: False)
    q = torch.randint(0, 16, (32, 64), generator=torch.Generator().manual_seed(0))
    pack = int4_weight(q, torch.full((32, 2), 0.01), torch.zeros(32, 2), 32)
    assert type(pack) is Int4Pack
    x = torch.randn(3, 64)
    torch.testing.assert_close(pack.matmul(x), x @ ((q.float() - 8) * 0.01).t(), rtol=2e-2, atol=2e-2)


@needs_compiler
@pytest.mark.parametrize("norm_cls", [RMSNorm, GemmaRMSNorm])
@pytest.mark.parametrize("rows, hidden", [(1, 576), (3, 100), (300, 576)])  # a tail past 16s; rows over threads
def test_rms_norm_equals_the_torch_path(norm_cls, rows, hidden, monkeypatch):
    """With the residual add and without: the sum written into the residual exactly as torch adds,
    the norm within float32 rounding (its sum of squares is ordered differently)."""
    torch.manual_seed(rows)
    norm = norm_cls(hidden, eps=1e-5)
    norm.weight.data = torch.randn(hidden) * 0.1 + (0 if norm_cls is GemmaRMSNorm else 1)
    x, residual = torch.randn(rows, hidden) * 3, torch.randn(rows, hidden)
    calls = []
    native = cpu_native.rms_norm
    monkeypatch.setattr(cpu_native, "rms_norm", lambda *args: calls.append(1) or native(*args))
    out, summed = norm(x, residual.clone())
    alone = norm(x)
    assert len(calls) == 2  # the C kernel ran both times
    monkeypatch.setattr(cpu_native, "load", lambda: None)
    ref_out, ref_summed = norm(x, residual.clone())
    assert torch.equal(summed, ref_summed)
    torch.testing.assert_close(out, ref_out, rtol=2e-6, atol=1e-6)
    torch.testing.assert_close(alone, norm(x), rtol=2e-6, atol=1e-6)


@needs_compiler
@pytest.mark.parametrize("head_dim, partial, positions", [(64, 1.0, [0, 5, 1023]), (96, 0.5, [7] * 70)])
def test_rotary_in_c_equals_the_torch_path_bit_for_bit(head_dim, partial, positions, monkeypatch):
    """q and k as the attention layer has them (views of the qkv projection's output), rotated in
    place; a partial rotary leaves the rest of each head as it was. 70 tokens: over the threads."""
    torch.manual_seed(head_dim)
    rotary = RotaryEmbedding(head_dim, 1024, {"rope_type": "default", "rope_theta": 10000.0,
                                               "partial_rotary_factor": partial})
    tokens, q_heads, kv_heads = len(positions), 6, 2
    qkv = torch.randn(tokens, (q_heads + 2 * kv_heads) * head_dim)
    positions = torch.tensor(positions)

    def rotated(qkv):
        q, k, _ = qkv.split([q_heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
        q, k = rotary(positions, q.view(tokens, q_heads, head_dim), k.view(tokens, kv_heads, head_dim))
        return q.clone(), k.clone(), qkv

    q, k, in_place = rotated(qkv.clone())
    assert torch.equal(in_place[:, : q_heads * head_dim].view(tokens, q_heads, head_dim), q)  # written into qkv
    assert torch.equal(in_place[:, (q_heads + kv_heads) * head_dim :], qkv[:, (q_heads + kv_heads) * head_dim :])
    monkeypatch.setattr(cpu_native, "load", lambda: None)
    ref_q, ref_k, untouched = rotated(qkv.clone())
    assert torch.equal(untouched, qkv)  # (the torch path rotates copies)
    assert torch.equal(q, ref_q) and torch.equal(k, ref_k)


@needs_compiler
@pytest.mark.parametrize("rows, n", [(1, 1536), (5, 37)])
def test_silu_and_mul_in_c_is_torchs_within_rounding(rows, n, monkeypatch):
    """e^x by the C polynomial: within a few float32 ulps of torch's, out to the clamps (|x| > 87)."""
    torch.manual_seed(n)
    x = torch.randn(rows, 2 * n) * 8
    x[0, :4] = torch.tensor([-100.0, -87.5, 90.0, 0.0])
    act, calls, native = SiluAndMul(), [], cpu_native.silu_and_mul
    monkeypatch.setattr(cpu_native, "silu_and_mul", lambda x: calls.append(1) or native(x))
    out = act(x)
    assert calls  # the C kernel ran
    monkeypatch.setattr(cpu_native, "load", lambda: None)
    torch.testing.assert_close(out, act(x), rtol=5e-7, atol=1e-30)


@needs_compiler
def test_positions_of_another_dtype_rotate_through_torch(monkeypatch):
    """The C rotary reads int64 positions: int32 ones take the torch path, rotated the same."""
    rotary = RotaryEmbedding(64, 1024, {"rope_type": "default", "rope_theta": 10000.0})
    q, k = torch.randn(3, 4, 64), torch.randn(3, 2, 64)
    calls, native = [], cpu_native.rotary_inplace
    monkeypatch.setattr(cpu_native, "rotary_inplace", lambda *args: calls.append(1) or native(*args))
    got = [t.clone() for t in rotary(torch.tensor([5, 900, 17], dtype=torch.int32), q.clone(), k.clone())]
    assert not calls
    want = rotary(torch.tensor([5, 900, 17]), q.clone(), k.clone())
    assert calls and all(torch.equal(a, b) for a, b in zip(got, want))
