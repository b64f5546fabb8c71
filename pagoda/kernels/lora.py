"""Triton kernels of batched LoRA: out[t] += x[t] @ A[s].T @ B[s].T for each token t whose
adapter slot s = indices[t] is >= 0 (-1: the base model alone), many adapters in one batch.

The tokens are first grouped by slot on the device (`group_tokens`: a stable sort of the token
indices by slot, then tiles of `block_m` tokens of one slot each), as vLLM's punica kernels do;
then two kernels, one program per tile (and per K, rank or N block):
- shrink, x @ A[s].T, split over K (K is large, the rank small: without the split a step's few
  tiles would leave most of the GPU idle), each split's partial sum in a float32 buffer that one
  sum reduces (in a fixed order: no atomics, the result is the same every run);
- expand, that @ B[s].T, added to the base output in place.
Each tile's tokens share their adapter's weights, read once per tile with `tl.dot`, so one kernel
pair serves decode steps and prompt chunks alike. Nothing is read on the host and every shape
follows from the token count alone, so a CUDA graph captures grouping and kernels with the slot
indices as its input; tiles past a step's tokens exit at once. The torch path (the CPU, and the
reference these are tested against) is pagoda/lora/layers.py's."""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

BLOCK_K = 64  # the shrink's K step
BLOCK_N = 128  # the expand's output columns per program
_SHRINK_PROGRAMS = 512  # what the split over K aims at: a few programs per SM of a large GPU
_MIN_K_BLOCKS_PER_SPLIT = 4


class TokenGroups(NamedTuple):
    """A step's tokens grouped by adapter slot. order: [T] int32, the token indices sorted by
    slot (stable; tokens without an adapter first); tiles: [3, max_tiles] int32, each tile's slot
    and its first and end row in `order` (an empty range past the step's tiles)."""

    order: torch.Tensor
    tiles: torch.Tensor
    block_m: int


def block_m_for(num_tokens: int) -> int:
    """Tokens per tile: small for decode steps, whose tokens spread over the adapters; larger for
    prompt chunks, so that each adapter's weights are read by fewer tiles."""
    return 16 if num_tokens <= 512 else 64


def group_tokens(indices: torch.Tensor, num_slots: int) -> TokenGroups:
    """indices: [T] int32, each token's slot in [0, num_slots) or -1. Torch ops only, none of
    which waits for the device, and every shape fixed by T and num_slots: graph-capturable."""
    num_tokens, device = indices.shape[0], indices.device
    block_m = block_m_for(num_tokens)
    sorted_slots, order = torch.sort(indices, stable=True)
    slot_ids = torch.arange(num_slots + 1, dtype=indices.dtype, device=device)
    bounds = torch.searchsorted(sorted_slots, slot_ids, out_int32=True)  # slot s: rows bounds[s]:bounds[s + 1]
    starts, ends = bounds[:-1], bounds[1:]
    tiles_per_slot = (ends - starts + block_m - 1) // block_m
    tile_ends = tiles_per_slot.cumsum(0, dtype=torch.int32)
    # sum over slots of ceil(count / block_m) < T / block_m + num_slots
    tile = torch.arange(triton.cdiv(num_tokens, block_m) + num_slots, dtype=torch.int32, device=device)
    tile_slot = torch.searchsorted(tile_ends, tile, right=True, out_int32=True)  # num_slots: past the last tile
    slot = tile_slot.clamp(max=num_slots - 1)
    first = starts[slot] + (tile - (tile_ends - tiles_per_slot)[slot]) * block_m
    end = torch.where(tile_slot < num_slots, torch.minimum(ends[slot], first + block_m), first)
    return TokenGroups(order.to(torch.int32), torch.stack([slot, first, end]), block_m)


def add_lora_triton(
    out: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, groups: TokenGroups
) -> None:
    """In place. out: [T, N]; x: [T, K]; lora_a: [slots, R, K]; lora_b: [slots, N, R] (scaled);
    groups: `group_tokens` of the T tokens' slots."""
    num_tokens, k = x.shape
    rank, n = lora_a.shape[1], out.shape[1]
    if num_tokens == 0:
        return
    x = x if x.stride(1) == 1 else x.contiguous()
    num_tiles, block_m = groups.tiles.shape[1], groups.block_m
    block_r = min(64, max(16, triton.next_power_of_2(rank)))  # tl.dot needs 16; 64 bounds the registers
    r_blocks = triton.cdiv(rank, block_r)
    k_per_split = _k_per_split(k, num_tiles * r_blocks)
    splits = triton.cdiv(k, k_per_split)
    precision = "ieee" if x.dtype == torch.float32 else "tf32"  # float32 models keep float32's accuracy
    partials = torch.empty(splits, num_tokens, rank, dtype=torch.float32, device=x.device)
    _shrink_kernel[(num_tiles, splits, r_blocks)](
        x, lora_a, groups.order, groups.tiles, partials, k, rank, k_per_split, num_tiles, x.stride(0),
        lora_a.stride(0), lora_a.stride(1), partials.stride(0), partials.stride(1),
        BLOCK_M=block_m, BLOCK_R=block_r, BLOCK_K=BLOCK_K, PRECISION=precision,
    )
    shrunk = partials[0] if splits == 1 else partials.sum(0)
    _expand_kernel[(num_tiles, triton.cdiv(n, BLOCK_N))](
        shrunk, lora_b, groups.order, groups.tiles, out, n, rank, num_tiles, shrunk.stride(0), lora_b.stride(0),
        lora_b.stride(1), out.stride(0), BLOCK_M=block_m, BLOCK_R=block_r, BLOCK_N=BLOCK_N, PRECISION=precision,
    )


def _k_per_split(k: int, programs_per_split: int) -> int:
    """Columns of K per shrink program: enough splits to give the GPU about _SHRINK_PROGRAMS
    programs, none shorter than a few K steps."""
    k_blocks = triton.cdiv(k, BLOCK_K)
    splits = max(1, min(k_blocks // _MIN_K_BLOCKS_PER_SPLIT, _SHRINK_PROGRAMS // programs_per_split))
    return triton.cdiv(k_blocks, splits) * BLOCK_K


@triton.jit
def _tile_tokens(order_ptr, tiles_ptr, num_tiles, BLOCK_M: tl.constexpr):
    """This program's tile: its slot, its tokens (int64) and which of its BLOCK_M rows are tokens."""
    tile = tl.program_id(0)
    slot = tl.load(tiles_ptr + tile).to(tl.int64)
    first = tl.load(tiles_ptr + num_tiles + tile)
    end = tl.load(tiles_ptr + 2 * num_tiles + tile)
    rows = first + tl.arange(0, BLOCK_M)
    valid = rows < end
    tokens = tl.load(order_ptr + rows, mask=valid, other=0).to(tl.int64)
    return slot, tokens, valid, first < end


@triton.jit
def _shrink_kernel(
    x_ptr, a_ptr, order_ptr, tiles_ptr, y_ptr, K, R, k_per_split, num_tiles, stride_x, stride_as, stride_ar,
    stride_ysplit, stride_y,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
):
    slot, tokens, valid, any_token = _tile_tokens(order_ptr, tiles_ptr, num_tiles, BLOCK_M)
    if any_token:
        split = tl.program_id(1)
        rs = tl.program_id(2) * BLOCK_R + tl.arange(0, BLOCK_R)
        k_start = split * k_per_split
        k_end = tl.minimum(K, k_start + k_per_split)
        acc = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
        for k0 in range(k_start, k_end, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + tokens[:, None] * stride_x + ks[None, :],
                        mask=valid[:, None] & (ks[None, :] < k_end), other=0.0)
            a_t = tl.load(a_ptr + slot * stride_as + rs[None, :] * stride_ar + ks[:, None],
                          mask=(rs[None, :] < R) & (ks[:, None] < k_end), other=0.0)
            acc = tl.dot(x, a_t, acc, input_precision=PRECISION)
        tl.store(y_ptr + split * stride_ysplit + tokens[:, None] * stride_y + rs[None, :], acc,
                 mask=valid[:, None] & (rs[None, :] < R))


@triton.jit
def _expand_kernel(
    y_ptr, b_ptr, order_ptr, tiles_ptr, out_ptr, N, R, num_tiles, stride_y, stride_bs, stride_bn, stride_out,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
):
    slot, tokens, valid, any_token = _tile_tokens(order_ptr, tiles_ptr, num_tiles, BLOCK_M)
    if any_token:
        ns = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for r0 in range(0, R, BLOCK_R):
            rs = r0 + tl.arange(0, BLOCK_R)
            y = tl.load(y_ptr + tokens[:, None] * stride_y + rs[None, :],
                        mask=valid[:, None] & (rs[None, :] < R), other=0.0)
            b_t = tl.load(b_ptr + slot * stride_bs + ns[None, :] * stride_bn + rs[:, None],
                          mask=(rs[:, None] < R) & (ns[None, :] < N), other=0.0)
            acc = tl.dot(y.to(b_t.dtype), b_t, acc, input_precision=PRECISION)
        mask = valid[:, None] & (ns[None, :] < N)
        ptrs = out_ptr + tokens[:, None] * stride_out + ns[None, :]
        base = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
        tl.store(ptrs, (base + acc).to(out_ptr.dtype.element_ty), mask=mask)
