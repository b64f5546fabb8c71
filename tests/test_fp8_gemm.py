"""The Triton FP8 GEMMs (pagoda/kernels/fp8_gemm.py) against the torch reference: the dequantized
operands multiplied in float32. Natively on a GPU (the 8B model's decode and prefill shapes too,
against cuBLASLt's torch._scaled_mm), under TRITON_INTERPRET=1 on the CPU (small shapes)."""

from __future__ import annotations

import pytest
import torch

from tests.kernel_device import DEVICE, ON_GPU, require_kernels

require_kernels()

from pagoda.kernels.fp8_gemm import (  # noqa: E402
    PERSISTENT_MIN_M,
    Fp8GemmConfig,
    decode_config,
    fp8_gemm,
    fp8_gemm_persistent,
    takes_persistent,
)
from pagoda.quantization.fp8 import quantize_fp8_rows  # noqa: E402

OUT_DTYPES = [torch.bfloat16, torch.float16] if ON_GPU else [torch.float32]
SMALL = Fp8GemmConfig(block_m=16, block_n=16, block_k=32, num_warps=4, num_stages=1)


def _operands(m: int, n: int, k: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    a, a_scale = quantize_fp8_rows(torch.randn(m, k, generator=g) * 3)
    b, b_scale = quantize_fp8_rows(torch.randn(n, k, generator=g) / 5)
    reference = (a.float() * a_scale) @ (b.float() * b_scale).t()
    return a.to(DEVICE), a_scale.to(DEVICE), b.to(DEVICE), b_scale.reshape(-1).to(DEVICE), reference


@pytest.mark.parametrize("out_dtype", OUT_DTYPES)
@pytest.mark.parametrize("m,n,k", [(1, 16, 32), (5, 48, 64), (33, 40, 80), (16, 16, 96)])
def test_matches_dequantized_matmul(m, n, k, out_dtype):
    """Partial tiles in M and N, K a multiple of the K tile or not (the masked loop)."""
    a, a_scale, b, b_scale, reference = _operands(m, n, k, seed=m * 1000 + n + k)
    out = fp8_gemm(a, a_scale, b, b_scale, out_dtype, SMALL)
    assert out.dtype == out_dtype and out.shape == (m, n)
    # float32 accumulation in another order, then one rounding to out_dtype.
    tol = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}[out_dtype]
    torch.testing.assert_close(out.cpu().float(), reference, rtol=tol, atol=tol * reference.abs().max().item())


@pytest.mark.parametrize("out_dtype", OUT_DTYPES)
@pytest.mark.parametrize("m,n,k,programs", [(33, 40, 80, 3), (64, 64, 64, 1), (5, 48, 64, 8), (70, 24, 128, 100)])
def test_persistent_matches_dequantized_matmul(m, n, k, programs, out_dtype):
    """The persistent kernel: partial tiles in M, N and K (the TMA's zero-filled loads and clipped
    stores), programs walking several tiles in groups of rows, more programs than tiles."""
    a, a_scale, b, b_scale, reference = _operands(m, n, k, seed=m * 1000 + n + k + 7)
    out = fp8_gemm_persistent(a, a_scale, b, b_scale, out_dtype, SMALL, programs=programs)
    assert out.dtype == out_dtype and out.shape == (m, n)
    tol = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}[out_dtype]
    torch.testing.assert_close(out.cpu().float(), reference, rtol=tol, atol=tol * reference.abs().max().item())


def test_scales_apply_per_row_and_column():
    """A row of a scaled by 2 doubles that output row; a row of b scaled by 3 triples that column."""
    a, a_scale, b, b_scale, _ = _operands(8, 16, 64, seed=1)
    out = fp8_gemm(a, a_scale, b, b_scale, OUT_DTYPES[-1], SMALL)
    a_scale2, b_scale2 = a_scale.clone(), b_scale.clone()
    a_scale2[3] *= 2
    b_scale2[5] *= 3
    scaled = fp8_gemm(a, a_scale2, b, b_scale2, OUT_DTYPES[-1], SMALL)
    expected = out.clone()
    expected[3] *= 2
    expected[:, 5] *= 3
    torch.testing.assert_close(scaled, expected)


def test_decode_config_takes_long_k_shapes_in_one_wave():
    """Only what was measured faster than cuBLASLt: a long K whose tiles make one wave of programs."""
    device = torch.device(DEVICE)
    sms = 132 if not ON_GPU else torch.cuda.get_device_properties(0).multi_processor_count
    chosen = {}
    for m in range(1, 1025):
        config = decode_config(m, 4096, 14336, device)
        if config is not None:
            programs = -(-m // config.block_m) * -(-4096 // config.block_n)
            assert 0.9 * sms <= programs <= sms, (m, config)
            chosen[m] = config
    if sms == 132:  # the H200's: M = 128 and 256 (measured), not 192 (a wave and a half, slower)
        assert 128 in chosen and 256 in chosen and 192 not in chosen and 512 not in chosen
    assert decode_config(256, 6144, 4096, device) is None  # qkv: K = 2/3 N


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU with FP8 (torch._scaled_mm)")
@pytest.mark.parametrize(
    "m,persistent", [(1, False), (64, False), (256, False), (PERSISTENT_MIN_M, True), (3000, True)]
)
@pytest.mark.parametrize("n,k", [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)])
def test_model_shapes_match_scaled_mm(m, persistent, n, k):
    """The 8B model's GEMMs against cuBLASLt: decode batches through the decode kernel at its default
    launch, prefill chunks through the persistent one (Hopper alone)."""
    from pagoda.quantization.fp8 import fp8_gemm_supported

    if not fp8_gemm_supported(torch.device("cuda")):
        pytest.skip("no FP8 tensor cores")
    if persistent and torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the persistent kernel runs on Hopper")
    torch.manual_seed(m + n + k)
    a, a_scale = quantize_fp8_rows(torch.randn(m, k, device="cuda"))
    b, b_scale = quantize_fp8_rows(torch.randn(n, k, device="cuda"))
    ours = (fp8_gemm_persistent if persistent else fp8_gemm)(a, a_scale, b, b_scale.reshape(-1), torch.bfloat16)
    theirs = torch._scaled_mm(a, b.t(), scale_a=a_scale, scale_b=b_scale.view(1, -1), out_dtype=torch.bfloat16)
    torch.testing.assert_close(ours.float(), theirs.float(), rtol=8e-3, atol=8e-3 * theirs.abs().max().item())


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU")
def test_persistent_takes_aligned_prefill_rows_on_hopper():
    """From PERSISTENT_MIN_M rows, on Hopper alone, 16-bit outputs, and only rows the TMA can address
    (16-byte aligned)."""
    hopper = torch.cuda.get_device_capability()[0] == 9
    b = torch.empty(4096, 4096, dtype=torch.float8_e4m3fn, device="cuda")
    a = torch.empty(PERSISTENT_MIN_M, 4096 + 16, dtype=torch.float8_e4m3fn, device="cuda")
    assert takes_persistent(a[:, :4096], b, torch.bfloat16) == hopper
    assert not takes_persistent(a[:PERSISTENT_MIN_M // 2, :4096], b, torch.bfloat16)
    assert not takes_persistent(a[:, 8:4104], b, torch.bfloat16)  # its base 8 bytes past an aligned one
    rows_of_4104 = torch.empty(PERSISTENT_MIN_M, 4104, dtype=torch.float8_e4m3fn, device="cuda")[:, :4096]
    assert not takes_persistent(rows_of_4104, b, torch.bfloat16)
    assert not takes_persistent(a[:, :4096], b, torch.float32)  # its output tile would not fit in shared memory
