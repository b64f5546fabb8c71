"""The fused-MoE Triton kernel (after vLLM's fused_moe): the (token, expert) pairs of a batch are
sorted by expert and each expert's run padded to a whole tile of rows, so that one grouped GEMM
launch serves every expert, each tile of rows reading one expert's weights. Two launches make an
expert: gate|up (rows gathered from the tokens), then down (scaled by the routing weight); the
k outputs of each token are summed at the end.

The sorting needs no host sync (the tile count is bounded by pairs + experts x (tile - 1), tiles
past the used ones exit at once), so decode steps can be captured in CUDA graphs."""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from pagoda.layers.activation import get_act_and_mul


class TileConfig(NamedTuple):
    """The grouped GEMM's tiling: rows (pairs) x columns x depth per program, and its launch."""

    block_m: int
    block_n: int = 64
    block_k: int = 32
    num_warps: int = 4
    num_stages: int = 3  # Triton's own defaults for both


def default_tile_config(num_pairs: int, num_experts: int) -> TileConfig:
    """By the pairs an expert gets on average: small tiles of rows with deep K steps while each
    expert reads its weights for a few rows (decode), wide tiles once the runs fill them. The
    fastest of scripts/bench_fused_moe.py's candidates on the H200 at Qwen3-30B-A3B's layer
    (128 experts, top 8): 111 us at 1 token against 128 for the earlier fixed (16|64, 64, 32)
    tiling, 391 against 595 at 64 tokens, 740 against 1,033 at 2,048."""
    per_expert = num_pairs / num_experts
    if per_expert <= 4:
        return TileConfig(16, 64, 128)
    if per_expert <= 16:
        return TileConfig(32, 64, 128)
    if per_expert <= 64 or _shared_memory_per_block() < 160 * 1024:
        return TileConfig(64, 128, 64, num_warps=8)
    return TileConfig(128, 256, 64, num_warps=8)  # 144 KiB of shared memory in three stages


@functools.cache
def _shared_memory_per_block() -> int:
    if not torch.cuda.is_available():  # Triton's interpreter
        return 0
    return torch.cuda.get_device_properties(torch.cuda.current_device()).shared_memory_per_block_optin


@triton.jit
def _grouped_gemm_kernel(
    a_ptr, b_ptr, c_ptr, weights_ptr, sorted_pairs_ptr, tile_expert_ptr,
    N, K, num_pairs, stride_am, stride_be, stride_bn, stride_cm,
    PAIRS_PER_A_ROW: tl.constexpr, MUL_WEIGHT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """C[pair] = A[pair // PAIRS_PER_A_ROW] @ B[expert].T (x the pair's routing weight), for the
    pairs of one tile of rows, all routed to the tile's expert."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pairs = tl.load(sorted_pairs_ptr + offs_m)
    if tl.load(sorted_pairs_ptr + pid_m * BLOCK_M) >= num_pairs:
        return  # a tile past the last expert's run: padding only
    row_mask = pairs < num_pairs
    expert = tl.load(tile_expert_ptr + pid_m).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    a_rows = (pairs // PAIRS_PER_A_ROW).to(tl.int64)
    a_ptrs = a_ptr + a_rows[:, None] * stride_am + offs_k[None, :]
    b_ptrs = b_ptr + expert * stride_be + offs_n[None, :].to(tl.int64) * stride_bn + offs_k[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_mask = offs_k + k0 < K
        a = tl.load(a_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_mask[:, None] & (offs_n[None, :] < N), other=0.0)
        acc += tl.dot(a, b)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    if MUL_WEIGHT:
        acc *= tl.load(weights_ptr + pairs, mask=row_mask, other=0.0)[:, None]
    c_ptrs = c_ptr + pairs[:, None].to(tl.int64) * stride_cm + offs_n[None, :]
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=row_mask[:, None] & (offs_n[None, :] < N))


def sort_by_expert(ids: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(sorted pairs, tile experts): the flat (token x k) pair indices grouped by expert, each
    expert's run padded with the sentinel `ids.numel()` to a multiple of block_m; the expert of each
    tile of block_m rows. Pairs whose expert is outside [0, num_experts) (another rank's) are left
    out."""
    flat = ids.flatten()
    num_pairs = flat.numel()
    local = (flat >= 0) & (flat < num_experts)
    key = torch.where(local, flat, num_experts)
    order = torch.argsort(key, stable=True)
    # Not torch.bincount: on CUDA it reads the largest key back to the host, which a decode
    # graph's capture cannot do.
    counts = torch.zeros(num_experts + 1, dtype=torch.int64, device=ids.device)
    counts = counts.scatter_add_(0, key, torch.ones_like(key))[:num_experts]
    padded = (counts + block_m - 1) // block_m * block_m
    padded_start = torch.cumsum(padded, 0) - padded
    start = torch.cumsum(counts, 0) - counts
    capacity = num_pairs + num_experts * (block_m - 1)
    capacity = (capacity + block_m - 1) // block_m * block_m
    sorted_pairs = torch.full((capacity,), num_pairs, dtype=torch.int32, device=ids.device)
    sorted_key = key[order]
    in_range = sorted_key < num_experts
    expert_of = sorted_key.clamp(max=num_experts - 1)
    rank_in_run = torch.arange(num_pairs, device=ids.device) - start[expert_of]
    position = torch.where(in_range, padded_start[expert_of] + rank_in_run, capacity)
    sorted_pairs = torch.cat([sorted_pairs, sorted_pairs[:1]])  # a slot for the dropped pairs
    sorted_pairs.scatter_(0, position, order.to(torch.int32))
    sorted_pairs = sorted_pairs[:capacity]
    tile_start = torch.arange(0, capacity, block_m, device=ids.device)
    ends = torch.cumsum(padded, 0)
    tile_expert = torch.searchsorted(ends, tile_start, right=True).clamp(max=num_experts - 1).to(torch.int32)
    return sorted_pairs, tile_expert


def _grouped_gemm(
    a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, sorted_pairs: torch.Tensor, tile_expert: torch.Tensor,
    pairs_per_a_row: int, weights: torch.Tensor | None, config: TileConfig,
) -> None:
    _, n, k = b.shape
    grid = (sorted_pairs.numel() // config.block_m, triton.cdiv(n, config.block_n))
    _grouped_gemm_kernel[grid](
        a, b, c, weights if weights is not None else c, sorted_pairs, tile_expert,
        n, k, c.shape[0], a.stride(0), b.stride(0), b.stride(1), c.stride(0),
        PAIRS_PER_A_ROW=pairs_per_a_row, MUL_WEIGHT=weights is not None,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )


def fused_experts(
    x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
    hidden_act: str, config: TileConfig | None = None,
) -> torch.Tensor:
    """sum over k of weights[:, k] * expert_{ids[:, k]}(x), as layers/moe.py's experts_torch:
    x [tokens, hidden], w13 [experts, 2 x inter, hidden], w2 [experts, hidden, inter], weights and
    ids [tokens, k]; ids outside [0, experts) contribute nothing. `config`: the tiling (the
    default's otherwise; scripts/bench_fused_moe.py compares others)."""
    tokens, top_k = ids.shape
    num_experts, hidden = w2.shape[0], w2.shape[1]
    config = config or default_tile_config(tokens * top_k, num_experts)
    sorted_pairs, tile_expert = sort_by_expert(ids, num_experts, config.block_m)
    x = x.contiguous()
    gate_up = torch.empty(tokens * top_k, w13.shape[1], dtype=x.dtype, device=x.device)
    _grouped_gemm(x, w13, gate_up, sorted_pairs, tile_expert, top_k, None, config)
    # Rows of dropped pairs hold garbage here; the down projection never reads them.
    hidden_states = get_act_and_mul(hidden_act)(gate_up)
    down = torch.zeros(tokens * top_k, hidden, dtype=x.dtype, device=x.device)
    routed = weights.to(torch.float32).flatten().contiguous()
    _grouped_gemm(hidden_states, w2, down, sorted_pairs, tile_expert, 1, routed, config)
    return down.view(tokens, top_k, hidden).sum(dim=1)
