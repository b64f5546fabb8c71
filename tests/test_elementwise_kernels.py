"""The Triton elementwise kernels (fused add + RMSNorm, in-place rotary, SiLU-and-mul, per-token FP8
quantization) against the
torch layers they replace on CUDA. The reference always runs the layer on CPU copies (its torch
path); the kernel runs natively on a GPU, or on the CPU under TRITON_INTERPRET=1."""

from __future__ import annotations

import pytest
import torch

from tests.kernel_device import DEVICE, ON_GPU, require_kernels

require_kernels()

from pagoda.kernels import cpu_native  # noqa: E402
from pagoda.kernels.elementwise import fp8_quantize_rows, rms_norm, rotary_inplace, silu_and_mul  # noqa: E402
from pagoda.layers.activation import SiluAndMul  # noqa: E402
from pagoda.layers.norm import GemmaRMSNorm, RMSNorm  # noqa: E402
from pagoda.layers.rotary import RotaryEmbedding  # noqa: E402
from pagoda.quantization.fp8 import FP8, FP8_MAX, quantize_fp8_rows  # noqa: E402

DTYPES = [torch.bfloat16, torch.float16] if ON_GPU else [torch.float32]
# One unit in the last place of the dtype, relative: the kernels round where the references do,
# but fp32 accumulation order may differ.
ULP = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


@pytest.fixture(autouse=True)
def _torch_reference(monkeypatch):
    """The CPU layers' torch path as the reference, not the CPU's C kernels (which rotate in place)."""
    monkeypatch.setattr(cpu_native, "load", lambda: None)


def _close(ours: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    torch.testing.assert_close(ours.cpu().float(), ref.float(), rtol=ULP[dtype], atol=ULP[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [64, 96])
@pytest.mark.parametrize("norm_class", [RMSNorm, GemmaRMSNorm])
def test_rms_norm_with_and_without_residual(dtype, hidden, norm_class):
    g = torch.Generator().manual_seed(hidden)
    x = torch.randn(7, hidden, generator=g).to(dtype)
    residual = torch.randn(7, hidden, generator=g).to(dtype)
    layer = norm_class(hidden, eps=1e-5)
    layer.weight.data = (torch.rand(hidden, generator=g) + 0.5).to(dtype)
    weight, order = layer._kernel_weight().to(DEVICE), layer.cast_before_scale

    _close(rms_norm(x.to(DEVICE), weight, 1e-5, cast_before_scale=order), layer(x), dtype)

    ref_out, ref_residual = layer(x, residual)
    residual_dev = residual.to(DEVICE)
    out = rms_norm(x.to(DEVICE), weight, 1e-5, residual_dev, cast_before_scale=order)
    _close(out, ref_out, dtype)
    _close(residual_dev, ref_residual, dtype)  # the sum is left in `residual` for the next layer


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim", [(4, 2, 16), (6, 1, 32), (3, 3, 8)])
def test_rotary_in_place_matches_rotate_half(dtype, num_heads, num_kv_heads, head_dim):
    g = torch.Generator().manual_seed(head_dim)
    rotary = RotaryEmbedding(head_dim, max_position=64, params={"rope_theta": 10000.0, "rope_type": "default"})
    positions = torch.randint(0, 64, (5,), generator=g)
    # q and k as views into one fused qkv output, as the model passes them.
    qkv = torch.randn(5, (num_heads + 2 * num_kv_heads) * head_dim, generator=g).to(dtype)
    q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
    q, k, _ = qkv.split([q_size, kv_size, kv_size], dim=-1)
    q, k = q.view(5, num_heads, head_dim), k.view(5, num_kv_heads, head_dim)
    ref_q, ref_k = rotary(positions, q, k)

    qkv_dev = qkv.to(DEVICE)
    q_dev, k_dev, v_dev = qkv_dev.split([q_size, kv_size, kv_size], dim=-1)
    rotary_inplace(
        positions.to(DEVICE), q_dev.view(5, num_heads, head_dim), k_dev.view(5, num_kv_heads, head_dim),
        rotary.cos_sin.to(DEVICE),
    )
    _close(q_dev.reshape(5, num_heads, head_dim), ref_q, dtype)
    _close(k_dev.reshape(5, num_kv_heads, head_dim), ref_k, dtype)
    assert torch.equal(v_dev.cpu(), qkv[:, q_size + kv_size :])  # v untouched


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("width", [24, 1500])
def test_silu_and_mul(dtype, width):
    g = torch.Generator().manual_seed(width)
    x = (3 * torch.randn(6, 2 * width, generator=g)).to(dtype)
    _close(silu_and_mul(x.to(DEVICE)), SiluAndMul()(x), dtype)


def _fp8_test_rows(cols: int, g: torch.Generator) -> torch.Tensor:
    """Rows of magnitudes from 1e-3 to 1e2, one all zero. Under the CPU's interpreter, which rounds to
    fp8 without carrying into the exponent (see test_kv_cache_fp8), rows of fp8 values times a power
    of two whose largest magnitude is FP8_MAX times it: x times 1 / scale is then exact and needs no rounding."""
    if ON_GPU:
        x = torch.randn(9, cols, generator=g) * torch.logspace(-3, 2, 9)[:, None]
    else:
        codes = torch.randint(0, 256, (9, cols), generator=g, dtype=torch.uint8)
        x = codes.view(FP8).float().nan_to_num(0.0) * torch.pow(2.0, torch.arange(-10, -1, dtype=torch.float32))[:, None]
        x[:, 0] = FP8_MAX * torch.pow(2.0, torch.arange(-10, -1, dtype=torch.float32))
    x[3] = 0  # an all-zero row takes the scale floor instead of dividing by zero
    return x


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cols", [64, 200])
def test_fp8_quantize_rows_matches_torch(dtype, cols):
    x = _fp8_test_rows(cols, torch.Generator().manual_seed(cols)).to(dtype)

    q, scale = fp8_quantize_rows(x.to(DEVICE), FP8)
    _, ref_scale = quantize_fp8_rows(x)
    # The GPU's fp32 division is within an ulp of torch's rounded one; given the scale, the values
    # are x times its rounded reciprocal, rounded to fp8 exactly.
    torch.testing.assert_close(scale.cpu(), ref_scale, rtol=2.4e-7, atol=0)
    ref_q = (x.float() * (1 / scale.cpu())).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    assert torch.equal(q.cpu().view(torch.uint8), ref_q.view(torch.uint8))

    static = torch.tensor([2.0**-10])  # one scale for every row; values past it clamp to the fp8 maximum
    q, scale = fp8_quantize_rows(x.to(DEVICE), FP8, static.to(DEVICE))
    ref_q = (x.float() * (1 / static)).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    assert ref_q.float().abs().max() == FP8_MAX
    assert torch.equal(q.cpu().view(torch.uint8), ref_q.view(torch.uint8))
    assert torch.equal(scale.cpu(), static.expand(9, 1))


def _same_fp8(fused: tuple[torch.Tensor, torch.Tensor], unfused: torch.Tensor, static: torch.Tensor | None) -> None:
    """A kernel's fp8 output equals fp8_quantize_rows of its unquantized output, bit for bit."""
    q, scale = fused
    ref_q, ref_scale = fp8_quantize_rows(unfused.reshape(-1, unfused.shape[-1]), FP8, static)
    assert torch.equal(q.cpu().view(torch.uint8), ref_q.cpu().view(torch.uint8))
    assert torch.equal(scale.cpu(), ref_scale.cpu())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("static", [None, 2.0**-6])
@pytest.mark.parametrize("norm_class", [RMSNorm, GemmaRMSNorm])
def test_rms_norm_quantizes_its_output_as_the_quantization_kernel_does(dtype, static, norm_class):
    g = torch.Generator().manual_seed(5)
    x = (4 * torch.randn(7, 96, generator=g)).to(dtype).to(DEVICE)
    residual = torch.randn(7, 96, generator=g).to(dtype).to(DEVICE)
    layer = norm_class(96, eps=1e-5)
    layer.weight.data = (torch.rand(96, generator=g) + 0.5).to(dtype)
    weight, order = layer._kernel_weight().to(DEVICE), layer.cast_before_scale
    static = None if static is None else torch.tensor([static], device=DEVICE)

    _same_fp8(rms_norm(x, weight, 1e-5, None, order, (FP8, static)), rms_norm(x, weight, 1e-5, None, order), static)
    fused_residual, residual_copy = residual.clone(), residual.clone()
    fused = rms_norm(x, weight, 1e-5, fused_residual, order, (FP8, static))
    _same_fp8(fused, rms_norm(x, weight, 1e-5, residual_copy, order), static)
    assert torch.equal(fused_residual, residual_copy)  # the sum is still left for the next layer


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("static", [None, 2.0**-6])
@pytest.mark.parametrize("width", [24, 1500])
def test_silu_and_mul_quantizes_its_output_as_the_quantization_kernel_does(dtype, static, width):
    g = torch.Generator().manual_seed(width)
    x = (3 * torch.randn(6, 2 * width, generator=g)).to(dtype).to(DEVICE)
    x[2] = 0  # a zero row: the scale floor
    static = None if static is None else torch.tensor([static], device=DEVICE)
    _same_fp8(silu_and_mul(x, (FP8, static)), silu_and_mul(x), static)
