"""The W4A16 GEMM: y = x @ W^T with W held as 4-bit integers and per-group scales (and zero
points), dequantized inside the Triton kernel, so that only the packed bytes cross memory.

The packed layout, and its torch reference, are pagoda/kernels/w4a16_layout.py's.

Two configurations: small M (decode), where reading the weight is the whole cost, splits K
across programs so that the few output tiles still fill every SM; large M uses big square tiles
and no split."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from pagoda.kernels.device_info import k_slices, k_splits
from pagoda.kernels.w4a16_layout import PACK


@triton.jit
def _w4a16_kernel(
    x_ptr, qweight_ptr, scales_ptr, zeros_ptr, g_idx_ptr, out_ptr,
    M, N, K, group_size, k_per_split, stride_xm, stride_om, stride_os,
    HAS_ZEROS: tl.constexpr, HAS_G_IDX: tl.constexpr, ONE_GROUP_PER_TILE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """out[pid_k] = x[:, ks] @ dequant(W)[:, ks]^T for this program's (M, N) tile and its K range ks.

    The packed tile is unpacked by a reshape into one [BLOCK_K, BLOCK_N] operand: on the H200
    that beat summing 8 dots over the nibbles (x's columns 8i + j against nibble j) by 2-7x
    from M = 16 up, and lost only ~10 % at M = 1."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    offs_packed = tl.arange(0, BLOCK_K // 8)
    shifts = tl.arange(0, 8) * 4
    dtype = scales_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    for k0 in range(k_start, k_end, BLOCK_K):
        ks = k0 + offs_k
        k_mask = ks < k_end
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + ks[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        rows = k0 // 8 + offs_packed
        packed = tl.load(
            qweight_ptr + rows[:, None].to(tl.int64) * N + offs_n[None, :],
            mask=(rows < k_end // 8)[:, None] & n_mask[None, :], other=0,
        )
        # [K/8, 8, N] -> [K, N]: row 8i + j is nibble j of packed row i.
        q = tl.reshape((packed[:, None, :] >> shifts[None, :, None]) & 0xF, (BLOCK_K, BLOCK_N)).to(dtype)
        if ONE_GROUP_PER_TILE:
            groups = tl.full((1,), 0, tl.int32) + k0 // group_size
            group_mask = n_mask[None, :]
        else:
            if HAS_G_IDX:
                groups = tl.load(g_idx_ptr + ks, mask=k_mask, other=0)
            else:
                groups = ks // group_size
            group_mask = k_mask[:, None] & n_mask[None, :]
        group_offs = groups[:, None].to(tl.int64) * N + offs_n[None, :]
        scale = tl.load(scales_ptr + group_offs, mask=group_mask, other=0.0)
        if HAS_ZEROS:
            zero = tl.load(zeros_ptr + group_offs, mask=group_mask, other=0.0)
        else:
            zero = 8.0
        w = ((q - zero) * scale).to(x.dtype)
        acc += tl.dot(x, w)
    out_ptrs = out_ptr + pid_k * stride_os + offs_m[:, None] * stride_om + offs_n[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


@dataclass(frozen=True)
class GemmConfig:
    block_m: int
    block_n: int
    block_k: int
    split_k: int
    num_warps: int
    num_stages: int


def choose_config(m: int, n: int, k: int, device: torch.device) -> GemmConfig:
    """Small M: the weight read is the cost, so 64-wide output tiles and split-K until the
    programs cover the SMs several times over (decode wants 8 waves in flight, M <= 64 two), in
    powers of two so the K slices come out even. Large M: 128-wide tiles, no split. (Picked
    from a sweep on the H200 at the 8B model's shapes.)"""
    if m <= 64:
        block_m = 16 if m <= 16 else 32 if m <= 32 else 64
        block_n, block_k = 64, 128
        tiles = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
        waves, most = (8, 8) if m <= 16 else (2, 4)
        split_k = min(k_splits(tiles, waves, most, device), triton.cdiv(k, block_k))
        return GemmConfig(block_m, block_n, block_k, split_k, num_warps=4, num_stages=4)
    block_m = 64 if m <= 128 else 128
    return GemmConfig(block_m, 128, 64, 1, num_warps=8 if block_m == 128 else 4, num_stages=3)


def _stages(cfg: GemmConfig, dtype: torch.dtype, one_group: bool) -> int:
    """cfg's pipeline depth, or 2 where float32 tiles with a scale (and zero) per input row would
    not fit: 4 stages of them need 266 KB of shared memory at the decode tiles, over an H100's 227."""
    return cfg.num_stages if one_group or dtype.itemsize < 4 else min(cfg.num_stages, 2)


def w4a16_gemm(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
    g_idx: torch.Tensor | None, group_size: int, config: GemmConfig | None = None,
) -> torch.Tensor:
    """y = x @ W^T for x [M, K] (the activation dtype of `scales`) and W in the packed layout."""
    m, k = x.shape
    n = qweight.shape[1]
    if qweight.shape[0] * PACK != k:
        raise ValueError(f"qweight has {qweight.shape[0] * PACK} input rows, x has {k}")
    x = x.contiguous()
    cfg = config or choose_config(m, n, k, x.device)
    block_k = cfg.block_k
    k_per_split, split_k = k_slices(k, cfg.split_k, block_k)
    one_group = g_idx is None and group_size % block_k == 0
    out_dtype = x.dtype if split_k == 1 else torch.float32
    out = torch.empty(split_k, m, n, dtype=out_dtype, device=x.device)
    grid = (triton.cdiv(m, cfg.block_m), triton.cdiv(n, cfg.block_n), split_k)
    _w4a16_kernel[grid](
        x, qweight, scales, scales if zeros is None else zeros, qweight if g_idx is None else g_idx, out,
        m, n, k, group_size, k_per_split, x.stride(0), out.stride(1), out.stride(0),
        HAS_ZEROS=zeros is not None, HAS_G_IDX=g_idx is not None, ONE_GROUP_PER_TILE=one_group,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=block_k,
        num_warps=cfg.num_warps, num_stages=_stages(cfg, x.dtype, one_group),
    )
    return out[0] if split_k == 1 else out.sum(0).to(x.dtype)


@triton.jit
def _w4_dequantize_kernel(
    qweight_ptr, scales_ptr, zeros_ptr, out_ptr, packed_rows, N, group_size,
    HAS_ZEROS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """out[8i + j, n] = (nibble j of qweight[i, n] - zero) * scale for this program's tile."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows < packed_rows)[:, None] & (offs_n < N)[None, :]
    packed = tl.load(qweight_ptr + rows[:, None].to(tl.int64) * N + offs_n[None, :], mask=mask, other=0)
    for j in tl.static_range(8):
        ks = rows * 8 + j
        group_offs = (ks // group_size)[:, None].to(tl.int64) * N + offs_n[None, :]
        scale = tl.load(scales_ptr + group_offs, mask=mask, other=0.0)
        if HAS_ZEROS:
            zero = tl.load(zeros_ptr + group_offs, mask=mask, other=0.0)
        else:
            zero = 8.0
        q = ((packed >> (4 * j)) & 0xF).to(scale.dtype)
        tl.store(out_ptr + ks[:, None].to(tl.int64) * N + offs_n[None, :], ((q - zero) * scale).to(scale.dtype), mask=mask)


def w4_dequantize(
    qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, group_size: int
) -> torch.Tensor:
    """W^T [K, N] in the scales' dtype from the packed layout (no g_idx), in one pass: for large M,
    where cuBLAS on the dequantized weight beats dequantizing inside a GEMM tile by tile."""
    packed_rows, n = qweight.shape
    out = torch.empty(packed_rows * PACK, n, dtype=scales.dtype, device=qweight.device)
    block_r, block_n = 16, 128
    _w4_dequantize_kernel[(triton.cdiv(packed_rows, block_r), triton.cdiv(n, block_n))](
        qweight, scales, scales if zeros is None else zeros, out, packed_rows, n, group_size,
        HAS_ZEROS=zeros is not None, BLOCK_R=block_r, BLOCK_N=block_n,
    )
    return out

