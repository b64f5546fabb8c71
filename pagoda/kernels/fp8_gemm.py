"""FP8 GEMMs with row-wise scales in Triton, where they beat cuBLASLt's (torch._scaled_mm), and the
one 16-bit GEMM shape where the same persistent kernel beats cuBLAS (`long_k_16bit_config`).

out = (a * a_scale) @ (b * b_scale)^T with a [M, K] and b [N, K] in fp8 (both K-major, as the
tensor cores take them), a_scale one float32 per row of a, b_scale one per row of b.
- Decode batches off Hopper, or of other sizes (decode_config): at M = 256 and N = 4096 (o_proj,
  down_proj of an 8B model) cuBLASLt's 128 x 128 tiles make 64 programs for 132 SMs; 64-row tiles
  fill them.
- Prefill chunks on Hopper (persistent_config): one program per SM walks 128 x 256 tiles in groups
  that share their rows of a in L2, its loads and stores through the TMA. cuBLASLt's row-wise
  scaled kernels take 128 x 128 tiles there: the 8B layer's four GEMMs took 8 % longer than these
  at M = 1,024 and 16,384, 3 % at 4,096 on an H100 (scripts/bench_fp8_gemm.py --prefill).
- Decode batches of 64 to 256 rows on Hopper: the same kernel with the decode kernel's 64 x 128
  tiles, where they make one wave of programs or four and more (persistent_config).
On Hopper both sum in the tensor cores' own accumulator over the whole of K, as vLLM's CUTLASS FP8
kernels do (fast accumulation). It keeps fewer bits than float32: at a K of 4,096 (14,336) the
largest error was 0.6 % (1.1 %) of the largest output, cuBLASLt's 0.3 %. Adding each K tile's
product to a float32 sum instead (`max_num_imprecise_acc`) made the persistent kernel twice as slow."""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from pagoda.kernels.device_info import is_hopper, num_sms

try:  # Triton 3.4 and later: TMA descriptors made on the host
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # older Triton: cuBLASLt runs the prefill shapes
    TensorDescriptor = None


class Fp8GemmConfig(NamedTuple):
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


@triton.jit
def _scaled(acc, a_scale_ptr, b_scale_ptr, offs_m, offs_n, M, N):
    """The tile's float32 sums times its rows' scales of a and its columns' of b."""
    a_scale = tl.load(a_scale_ptr + offs_m, mask=offs_m < M, other=0.0)
    b_scale = tl.load(b_scale_ptr + offs_n, mask=offs_n < N, other=0.0)
    return acc * a_scale[:, None] * b_scale[None, :]


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
    out = _scaled(acc, a_scale_ptr, b_scale_ptr, offs_m, offs_n, M, N)
    out_ptrs = out_ptr + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :]
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


@triton.jit(do_not_specialize=["M", "programs"])
def _persistent_gemm_kernel(
    a_desc, b_desc, out_desc, a_scale_ptr, b_scale_ptr, M, N, K, programs,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    SCALED: tl.constexpr,
):
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    # Tiles go GROUP_M rows of tiles at a time, column by column: the programs running at once read
    # the same few row blocks of a and column blocks of b, which stay in L2.
    in_group = GROUP_M * tiles_n
    for tile in tl.range(tl.program_id(0), tiles_m * tiles_n, programs, flatten=True):
        first_m = tile // in_group * GROUP_M
        rows = tl.minimum(tiles_m - first_m, GROUP_M)
        pid_m = first_m + tile % in_group % rows
        pid_n = tile % in_group // rows
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):  # the TMA fills a partial tile's outside with zeros
            a = a_desc.load([pid_m * BLOCK_M, k0])
            b = b_desc.load([pid_n * BLOCK_N, k0])
            acc = tl.dot(a, b.T, acc)
        if SCALED:  # fp8 operands: their rows' scales
            offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
            offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
            acc = _scaled(acc, a_scale_ptr, b_scale_ptr, offs_m, offs_n, M, N)
        out_desc.store([pid_m * BLOCK_M, pid_n * BLOCK_N], acc.to(out_desc.dtype))  # clipped at the edges


DEFAULT_CONFIG = Fp8GemmConfig(64, 128, 256, 4, 4)
# For a long K at decode batches: the tile width that makes one program per SM wins.
_LONG_K_CONFIGS = (DEFAULT_CONFIG, Fp8GemmConfig(64, 64, 256, 8, 4))
# 208 KiB of shared memory: 3 stages of a and b tiles, and the 16-bit output tile the TMA stores.
PERSISTENT_CONFIG = Fp8GemmConfig(128, 256, 128, 8, 3)
PERSISTENT_MIN_M = 1024  # from M = 512 down, cuBLASLt was as fast with these tiles
# Decode batches measured (64 to 256 rows) where DEFAULT_CONFIG's tiles take the persistent kernel.
PERSISTENT_DECODE_ROWS = range(64, 257)
_GROUP_M = 8
# 16-bit long-K decode GEMMs (long_k_16bit_config): 4 stages of a's and b's tiles and the output tile, 208 KiB.
LONG_K_16BIT_CONFIG = Fp8GemmConfig(64, 128, 128, 4, 4)


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
        if _one_wave(triton.cdiv(m, config.block_m) * triton.cdiv(n, config.block_n), sms):
            return config
    return None


def _one_wave(tiles: int, sms: int) -> bool:
    """Whether one program a tile makes one wave that leaves at most a tenth of the SMs idle."""
    return 0.9 * sms <= tiles <= sms


def _tma_addressable(n: int, *operands: torch.Tensor) -> bool:
    """Whether the TMA can read the operands and write an [M, n] 16-bit output: 16-byte aligned
    rows and bases."""
    return n % 8 == 0 and all(t.stride(0) * t.element_size() % 16 == 0 and t.data_ptr() % 16 == 0 for t in operands)


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


def persistent_config(a: torch.Tensor, b: torch.Tensor, out_dtype: torch.dtype) -> Fp8GemmConfig | None:
    """The configuration fp8_gemm_persistent runs a @ b^T with, or None where another kernel runs it.

    On Hopper, for 16-bit outputs (a float32 tile would not fit beside the stages in shared memory)
    and the 16-byte aligned rows and bases that the TMA reads and writes: prefill chunks (from
    PERSISTENT_MIN_M rows) in PERSISTENT_CONFIG's tiles; decode batches (PERSISTENT_DECODE_ROWS) in
    DEFAULT_CONFIG's where they make at most one wave of programs or at least four. Measured on an
    H100 with the weights out of L2 (`scripts/bench_fp8_gemm.py`, 8B shapes): at 256 rows o_proj
    took 11.3 us against cuBLASLt's 13.7, down_proj 31.8 against 39.6 (the decode kernel's 34.6),
    gate_up 65.8 against 67.4; at 192 rows gate_up 57.8 against 75.4. In between one and four
    waves (qkv_proj at 192 and 256 rows, gate_up at 64 and 128) it was 4 % faster to 10 % slower."""
    m, n = a.shape[0], b.shape[0]
    if TensorDescriptor is None or not (m >= PERSISTENT_MIN_M or m in PERSISTENT_DECODE_ROWS):
        return None  # the cheap checks first: every decode step's GEMMs ask
    if not (is_hopper(a.device) and out_dtype in (torch.bfloat16, torch.float16) and _tma_addressable(n, a, b)):
        return None
    if m >= PERSISTENT_MIN_M:
        return PERSISTENT_CONFIG
    sms = num_sms(a.device)
    tiles = triton.cdiv(m, DEFAULT_CONFIG.block_m) * triton.cdiv(n, DEFAULT_CONFIG.block_n)
    return DEFAULT_CONFIG if tiles <= sms or tiles >= 4 * sms else None


def fp8_gemm_persistent(
    a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor, out_dtype: torch.dtype,
    config: Fp8GemmConfig = PERSISTENT_CONFIG, programs: int | None = None,
) -> torch.Tensor:
    """fp8_gemm's product through the persistent kernel: at most `programs` programs (one per SM by
    default), each walking its share of the output tiles. a and b as persistent_config needs them."""
    return _persistent_gemm(a, b, (a_scale, b_scale), out_dtype, config, programs)


def long_k_16bit_config(a: torch.Tensor, b: torch.Tensor) -> Fp8GemmConfig | None:
    """The persistent kernel's tiles for a 16-bit a @ b^T (a [M, K], b [N, K]) where they beat
    cuBLAS, or None: on Hopper, a long K (K >= 3 N: down_proj) at a decode batch whose 64-row tiles
    make one wave of programs, as decode_config's fp8 rule. Measured on an H100 with the weights
    out of L2, the 8B shapes at 256 rows: down_proj 58.0 us against cuBLAS's 67.7 (its 128 x 64
    tiles). Of the other layers only o_proj was faster in the best of 45 tile configurations, by 4 %;
    qkv_proj was 16 % slower, gate_up_proj 7 %."""
    (m, k), n = a.shape, b.shape[0]
    if TensorDescriptor is None or k < 3 * n or a.dtype not in (torch.bfloat16, torch.float16) or b.dtype != a.dtype:
        return None  # the cheap checks first: every 16-bit linear layer on a GPU asks
    tiles = triton.cdiv(m, LONG_K_16BIT_CONFIG.block_m) * triton.cdiv(n, LONG_K_16BIT_CONFIG.block_n)
    if not (is_hopper(a.device) and _one_wave(tiles, num_sms(a.device)) and a.stride(1) == b.stride(1) == 1
            and _tma_addressable(n, a, b)):
        return None
    return LONG_K_16BIT_CONFIG


def gemm_persistent(
    a: torch.Tensor, b: torch.Tensor, config: Fp8GemmConfig = LONG_K_16BIT_CONFIG, programs: int | None = None
) -> torch.Tensor:
    """a @ b^T (a [M, K], b [N, K]) through the persistent kernel, in their dtype, unscaled."""
    return _persistent_gemm(a, b, None, a.dtype, config, programs)


def _persistent_gemm(
    a: torch.Tensor, b: torch.Tensor, scales: tuple[torch.Tensor, torch.Tensor] | None, out_dtype: torch.dtype,
    config: Fp8GemmConfig, programs: int | None,
) -> torch.Tensor:
    (m, k), n = a.shape, b.shape[0]
    assert b.shape[1] == k and a.stride(1) == 1 and b.stride(1) == 1, (a.shape, b.shape)
    out = torch.empty(m, n, dtype=out_dtype, device=a.device)
    tiles = triton.cdiv(m, config.block_m) * triton.cdiv(n, config.block_n)
    programs = min(tiles, programs or num_sms(a.device))
    a_scale, b_scale = scales or (out, out)  # unscaled: not read
    _persistent_gemm_kernel[(programs,)](
        TensorDescriptor.from_tensor(a, [config.block_m, config.block_k]),
        TensorDescriptor.from_tensor(b, [config.block_n, config.block_k]),
        TensorDescriptor.from_tensor(out, [config.block_m, config.block_n]),
        a_scale, b_scale, m, n, k, programs,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k, GROUP_M=_GROUP_M,
        SCALED=scales is not None, num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return out
