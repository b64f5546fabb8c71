"""The Triton FP8 GEMMs (pagoda/kernels/fp8_gemm.py) against the torch reference: the dequantized
operands multiplied in float32. Natively on a GPU (the 8B model's decode and prefill shapes too,
against cuBLASLt's torch._scaled_mm), under TRITON_INTERPRET=1 on the CPU (small shapes)."""

from __future__ import annotations

import pytest
import torch

from tests.kernel_device import DEVICE, ON_GPU, require_kernels

require_kernels()

from pagoda.kernels import fp8_gemm as fp8_gemm_module  # noqa: E402
from pagoda.kernels.fp8_gemm import (  # noqa: E402
    DEFAULT_CONFIG,
    PERSISTENT_CONFIG,
    PERSISTENT_MIN_M,
    Fp8GemmConfig,
    LONG_K_16BIT_CONFIG,
    decode_config,
    fp8_gemm,
    fp8_gemm_persistent,
    gemm_persistent,
    long_k_16bit_config,
    persistent_config,
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


@pytest.mark.parametrize("m,n,k,programs", [(33, 40, 80, 3), (64, 64, 64, 1), (70, 24, 128, 100)])
def test_persistent_unscaled_matches_matmul(m, n, k, programs):
    """The persistent kernel without scales (16-bit operands on the GPU; float32 in the interpreter)."""
    dtype = torch.bfloat16 if ON_GPU else torch.float32
    g = torch.Generator().manual_seed(m + n + k)
    a, b = torch.randn(m, k, generator=g).to(dtype), torch.randn(n, k, generator=g).to(dtype)
    reference = a.float() @ b.float().t()
    out = gemm_persistent(a.to(DEVICE), b.to(DEVICE), SMALL, programs=programs)
    assert out.dtype == dtype and out.shape == (m, n)
    tol = 8e-3 if ON_GPU else 1e-5
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


def test_persistent_config_on_hopper(monkeypatch):
    """Which GEMMs the persistent kernel takes on a Hopper GPU of 132 SMs (the H100's and H200's):
    prefill chunks; decode batches of 64 to 256 rows whose 64 x 128 tiles make at most one wave or
    at least four; 16-bit outputs whose operands the TMA can address."""
    monkeypatch.setattr(fp8_gemm_module, "is_hopper", lambda device: True)
    monkeypatch.setattr(fp8_gemm_module, "num_sms", lambda device: 132)
    k = 64  # K does not decide

    def config(m: int, n: int, out_dtype: torch.dtype = torch.bfloat16, a: torch.Tensor | None = None):
        a = torch.empty(m, k, dtype=torch.float8_e4m3fn) if a is None else a
        return persistent_config(a, torch.empty(n, k, dtype=torch.float8_e4m3fn), out_dtype)

    assert config(PERSISTENT_MIN_M, 4096) == config(3000, 6144, torch.float16) == PERSISTENT_CONFIG
    assert config(512, 4096) is None and config(32, 4096) is None and config(257, 4096) is None
    for m in (64, 128, 192, 256):  # o_proj and down_proj (N = 4,096): 32 to 128 programs, one wave
        assert config(m, 4096) == DEFAULT_CONFIG
    assert config(192, 28672) == config(256, 28672) == DEFAULT_CONFIG  # gate_up: 672 and 896 tiles
    assert config(64, 28672) is None and config(128, 28672) is None  # 224 and 448: 1.7 and 3.4 waves
    assert config(128, 6144) == DEFAULT_CONFIG and config(256, 6144) is None  # qkv: 96 and 192 tiles
    assert config(PERSISTENT_MIN_M, 4096, torch.float32) is None  # its output tile would not fit in shared memory
    assert config(256, 4100) is None  # rows of the output not 16-byte aligned
    wide = torch.empty(PERSISTENT_MIN_M, k + 16, dtype=torch.float8_e4m3fn)
    assert config(PERSISTENT_MIN_M, 4096, a=wide[:, :k]) == PERSISTENT_CONFIG
    assert config(PERSISTENT_MIN_M, 4096, a=wide[:, 8:k + 8]) is None  # its base 8 bytes past an aligned one
    rows_of_72 = torch.empty(PERSISTENT_MIN_M, k + 8, dtype=torch.float8_e4m3fn)[:, :k]
    assert config(PERSISTENT_MIN_M, 4096, a=rows_of_72) is None
    monkeypatch.setattr(fp8_gemm_module, "is_hopper", lambda device: False)
    assert config(PERSISTENT_MIN_M, 4096) is None and config(256, 4096) is None


def test_long_k_16bit_config_on_hopper(monkeypatch):
    """Which 16-bit GEMMs the persistent kernel takes from cuBLAS on a Hopper GPU of 132 SMs: a
    long K (down_proj) whose 64 x 128 tiles make one wave, operands the TMA can address."""
    monkeypatch.setattr(fp8_gemm_module, "is_hopper", lambda device: True)
    monkeypatch.setattr(fp8_gemm_module, "num_sms", lambda device: 132)

    def config(m: int, n: int, k: int, dtype: torch.dtype = torch.bfloat16, a: torch.Tensor | None = None):
        a = torch.empty(m, k, dtype=dtype) if a is None else a
        return long_k_16bit_config(a, torch.empty(n, k, dtype=dtype))

    assert config(256, 4096, 14336) == config(193, 4096, 14336, torch.float16) == LONG_K_16BIT_CONFIG  # 128 tiles
    assert config(192, 4096, 14336) is None and config(257, 4096, 14336) is None  # 96 and 160 tiles
    assert config(256, 4096, 4096) is None and config(256, 28672, 4096) is None  # o_proj, gate_up: short K
    assert config(256, 4096, 14336, torch.float32) is None
    assert config(256, 4096, 14336, a=torch.empty(256, 14336 + 4, dtype=torch.bfloat16)[:, :14336]) is None
    monkeypatch.setattr(fp8_gemm_module, "is_hopper", lambda device: False)
    assert config(256, 4096, 14336) is None


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU")
@pytest.mark.parametrize("m", [1, 200, 256])
@pytest.mark.parametrize("n,k", [(4096, 14336), (6144, 4096)])
def test_16bit_model_shapes_match_cublas(m, n, k):
    """The 8B model's bf16 GEMMs through the persistent kernel (its long-K tiles) against cuBLAS."""
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the persistent kernel runs on Hopper")
    torch.manual_seed(m + n + k)
    a = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
    theirs = a @ b.t()
    ours = gemm_persistent(a, b)
    torch.testing.assert_close(ours.float(), theirs.float(), rtol=8e-3, atol=8e-3 * theirs.abs().max().item())


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU with FP8 (torch._scaled_mm)")
@pytest.mark.parametrize(
    "m,kernel",
    [(1, "decode"), (64, "decode"), (256, "decode"), (64, "persistent"), (256, "persistent"),
     (PERSISTENT_MIN_M, "persistent"), (3000, "persistent")],
)
@pytest.mark.parametrize("n,k", [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)])
def test_model_shapes_match_scaled_mm(m, kernel, n, k):
    """The 8B model's GEMMs against cuBLASLt: decode batches through the decode kernel at its default
    launch, and on Hopper through the persistent one with its decode tiles; prefill chunks through
    the persistent one with its own."""
    from pagoda.quantization.fp8 import fp8_gemm_supported

    if not fp8_gemm_supported(torch.device("cuda")):
        pytest.skip("no FP8 tensor cores")
    if kernel == "persistent" and torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the persistent kernel runs on Hopper")
    torch.manual_seed(m + n + k)
    a, a_scale = quantize_fp8_rows(torch.randn(m, k, device="cuda"))
    b, b_scale = quantize_fp8_rows(torch.randn(n, k, device="cuda"))
    if kernel == "decode":
        ours = fp8_gemm(a, a_scale, b, b_scale.reshape(-1), torch.bfloat16)
    else:
        config = PERSISTENT_CONFIG if m >= PERSISTENT_MIN_M else DEFAULT_CONFIG
        ours = fp8_gemm_persistent(a, a_scale, b, b_scale.reshape(-1), torch.bfloat16, config)
    theirs = torch._scaled_mm(a, b.t(), scale_a=a_scale, scale_b=b_scale.view(1, -1), out_dtype=torch.bfloat16)
    torch.testing.assert_close(ours.float(), theirs.float(), rtol=8e-3, atol=8e-3 * theirs.abs().max().item())


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU")
def test_persistent_config_follows_the_device():
    """The persistent kernel on a Hopper GPU alone (is_hopper and num_sms read from the device)."""
    hopper = torch.cuda.get_device_capability()[0] == 9
    b = torch.empty(4096, 4096, dtype=torch.float8_e4m3fn, device="cuda")
    a = torch.empty(PERSISTENT_MIN_M, 4096, dtype=torch.float8_e4m3fn, device="cuda")
    assert (persistent_config(a, b, torch.bfloat16) == PERSISTENT_CONFIG) == hopper
    assert (persistent_config(a[:256], b, torch.bfloat16) == DEFAULT_CONFIG) == hopper
