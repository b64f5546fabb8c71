"""An FP8 GEMM with row-wise scales in Triton, for the decode batches cuBLASLt tiles badly.

out = (a * a_scale) @ (b * b_scale)^T with a [M, K] and b [N, K] in fp8 (both K-major, as the
tensor cores take them), a_scale one float32 per row of a, b_scale one per row of b. At a decode
batch (M = 256) and N = 4096 (o_proj, down_proj of an 8B model) cuBLASLt's 128 x 128 tiles make 64
programs for the H200's 132 SMs; 64-row tiles fill them. Where that pays: decode_config."""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from pagoda.kernels.device_info import num_sms


class Fp8GemmConfig(NamedTuple):
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


# M follows the batch: specialised (a multiple of 16 or not) it would compile again mid-serving.
@triton.jit(do_not_specialize=["M"])
def _fp8_gemm_kernel(
    a_ptr, b_ptr, a_scale_ptr, b_scale_ptr, out_ptr, M, N, K, stride_am, stride_bn, stride_om,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
):
    # Consecutive programs share an N tile (the weight's), so its bytes are read from L2 after the first.
    num_m = tl.cdiv(M, BLOCK_M)
    pid = tl.program_id(0)
    pid_m = pid % num_m
    pid_n = pid // num_m
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < M
    n_mask = offs_n < N
    a_ptrs = a_ptr + offs_m[:, None].to(tl.int64) * stride_am + offs_k[None, :]
    b_ptrs = b_ptr + offs_n[None, :].to(tl.int64) * stride_bn + offs_k[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs, mask=m_mask[:, None], other=0.0)
            b = tl.load(b_ptrs, mask=n_mask[None, :], other=0.0)
        else:
            k_mask = k0 + offs_k < K
            a = tl.load(a_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=n_mask[None, :] & k_mask[:, None], other=0.0)
        acc = tl.dot(a, b, acc)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    a_scale = tl.load(a_scale_ptr + offs_m, mask=m_mask, other=0.0)
    b_scale = tl.load(b_scale_ptr + offs_n, mask=n_mask, other=0.0)
    out = acc * a_scale[:, None] * b_scale[None, :]
    out_ptrs = out_ptr + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :]
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


DEFAULT_CONFIG = Fp8GemmConfig(64, 128, 256, 4, 4)
# For a long K at decode batches: the tile width that makes one program per SM wins.
_LONG_K_CONFIGS = (DEFAULT_CONFIG, Fp8GemmConfig(64, 64, 256, 8, 4))


def decode_config(m: int, n: int, k: int, device: torch.device) -> Fp8GemmConfig | None:
    """The configuration to run a GEMM of this shape with, or None where cuBLASLt is as fast.

    Measured on the H200 (`scripts/bench_fp8_gemm.py`, 8B shapes): a long K (down_proj, K = 3.5 N)
    gains where 64-row tiles make one wave of programs (90-100 % of the SMs): 43.6 -> 36.7 us at
    M = 256, 42.2 -> 34.0 at M = 128: cuBLASLt's 128 x 128 tiles leave half the SMs idle for the
    whole of the K loop. A wave and a half (M = 192 with 64 x 64 tiles) lost, 43.7 -> 53.1; other
    shapes were within 10 %, and slower from M = 512."""
    if k < 3 * n:
        return None
    sms = num_sms(device)
    for config in _LONG_K_CONFIGS:
        if 0.9 * sms <= triton.cdiv(m, config.block_m) * triton.cdiv(n, config.block_n) <= sms:
            return config
    return None


def fp8_gemm(
    a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor, out_dtype: torch.dtype,
    config: Fp8GemmConfig = DEFAULT_CONFIG,
) -> torch.Tensor:
    """(a * a_scale) @ (b * b_scale)^T in out_dtype: a [M, K], b [N, K] fp8 with unit stride along K;
    a_scale [M] or [M, 1], b_scale [N] float32."""
    (m, k), n = a.shape, b.shape[0]
    assert b.shape[1] == k and a.stride(1) == 1 and b.stride(1) == 1, (a.shape, b.shape)
    out = torch.empty(m, n, dtype=out_dtype, device=a.device)
    grid = (triton.cdiv(m, config.block_m) * triton.cdiv(n, config.block_n),)
    _fp8_gemm_kernel[grid](
        a, b, a_scale, b_scale, out, m, n, k, a.stride(0), b.stride(0), out.stride(0),
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k, EVEN_K=k % config.block_k == 0,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return out
