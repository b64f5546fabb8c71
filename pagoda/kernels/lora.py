"""Triton kernels of batched LoRA: out[t] += x[t] @ A[s].T @ B[s].T for each token t whose
adapter slot s = indices[t] is >= 0 (-1: the base model alone), many adapters in one batch.

Two kernels, as punica's BGMV: shrink (x @ A.T, into a float32 [tokens, rank] buffer) and
expand (that @ B.T, added to out), one program per token and block, each reading its token's
slot; a token without an adapter loads and stores nothing. Neither reads anything on the host,
so a CUDA graph captures them with `indices` as its input. The torch path (the CPU, and the
reference these are tested against) is pagoda/lora/layers.py's."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def add_lora_triton(
    out: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, indices: torch.Tensor
) -> None:
    """In place. out: [T, N]; x: [T, K]; lora_a: [slots, R, K]; lora_b: [slots, N, R] (scaled);
    indices: [T] int32, each token's slot or -1."""
    num_tokens, k = x.shape
    rank, n = lora_a.shape[1], out.shape[1]
    if num_tokens == 0:
        return
    x = x if x.stride(1) == 1 else x.contiguous()
    shrunk = torch.empty(num_tokens, rank, dtype=torch.float32, device=x.device)
    block_r = min(16, triton.next_power_of_2(rank))
    _shrink_kernel[(num_tokens, triton.cdiv(rank, block_r))](
        x, lora_a, indices, shrunk, k, rank, x.stride(0), lora_a.stride(0), lora_a.stride(1), shrunk.stride(0),
        BLOCK_R=block_r, BLOCK_K=128,
    )
    block_n = 64
    _expand_kernel[(num_tokens, triton.cdiv(n, block_n))](
        shrunk, lora_b, indices, out, n, rank, shrunk.stride(0), lora_b.stride(0), lora_b.stride(1), out.stride(0),
        BLOCK_N=block_n, BLOCK_R=triton.next_power_of_2(rank),
    )


@triton.jit
def _shrink_kernel(
    x_ptr, a_ptr, idx_ptr, y_ptr, K, R, stride_x, stride_as, stride_ar, stride_y,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(idx_ptr + token).to(tl.int64)
    # A token without an adapter (-1) sees empty bounds: it loads and stores nothing.
    K = tl.where(slot >= 0, K, 0)
    R = tl.where(slot >= 0, R, 0)
    slot = tl.maximum(slot, 0)
    rs = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    acc = tl.zeros([BLOCK_R], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        xk = tl.load(x_ptr + token * stride_x + ks, mask=ks < K, other=0.0).to(tl.float32)
        a = tl.load(
            a_ptr + slot * stride_as + rs[:, None] * stride_ar + ks[None, :],
            mask=(rs[:, None] < R) & (ks[None, :] < K), other=0.0,
        ).to(tl.float32)
        acc += tl.sum(a * xk[None, :], axis=1)
    tl.store(y_ptr + token * stride_y + rs, acc, mask=rs < R)


@triton.jit
def _expand_kernel(
    y_ptr, b_ptr, idx_ptr, out_ptr, N, R, stride_y, stride_bs, stride_bn, stride_out,
    BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(idx_ptr + token).to(tl.int64)
    # As in the shrink: a token without an adapter has nothing to add.
    N = tl.where(slot >= 0, N, 0)
    R = tl.where(slot >= 0, R, 0)
    slot = tl.maximum(slot, 0)
    ns = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rs = tl.arange(0, BLOCK_R)
    y = tl.load(y_ptr + token * stride_y + rs, mask=rs < R, other=0.0)
    b = tl.load(
        b_ptr + slot * stride_bs + ns[:, None] * stride_bn + rs[None, :],
        mask=(ns[:, None] < N) & (rs[None, :] < R), other=0.0,
    ).to(tl.float32)
    delta = tl.sum(b * y[None, :], axis=1)
    mask = ns < N
    base = tl.load(out_ptr + token * stride_out + ns, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + token * stride_out + ns, (base + delta).to(out_ptr.dtype.element_ty), mask=mask)


def add_lora_segments_triton(
    out: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, segments: torch.Tensor,
    max_segment_len: int,
) -> None:
    """add_lora_triton's sum over runs of tokens that share an adapter, as punica's SGMV: each program multiplies
    a tile of one run's tokens with its adapter's A, then B, on the tensor cores. segments: [3, S]
    int32, each run's first token, length and slot (runs without an adapter are left out). For
    steps with prompt chunks; a decode step's one-token runs are add_lora_triton's."""
    num_segments = segments.shape[1]
    k, rank, n = x.shape[1], lora_a.shape[1], out.shape[1]
    if num_segments == 0:
        return
    x = x if x.stride(1) == 1 else x.contiguous()
    shrunk = torch.empty(x.shape[0], rank, dtype=torch.float32, device=x.device)
    block_m, block_r = 32, max(16, triton.next_power_of_2(rank))
    precision = "ieee" if x.dtype == torch.float32 else "tf32"  # float32 models keep float32's accuracy
    m_blocks = triton.cdiv(max_segment_len, block_m)
    starts, lengths, slots = segments[0], segments[1], segments[2]
    _segment_shrink_kernel[(num_segments, m_blocks)](
        x, lora_a, starts, lengths, slots, shrunk, k, rank, x.stride(0), lora_a.stride(0), lora_a.stride(1),
        shrunk.stride(0), BLOCK_M=block_m, BLOCK_R=block_r, BLOCK_K=64, PRECISION=precision,
    )
    block_n = 64
    _segment_expand_kernel[(num_segments, m_blocks, triton.cdiv(n, block_n))](
        shrunk, lora_b, starts, lengths, slots, out, n, rank, shrunk.stride(0), lora_b.stride(0), lora_b.stride(1),
        out.stride(0), BLOCK_M=block_m, BLOCK_R=block_r, BLOCK_N=block_n, PRECISION=precision,
    )


@triton.jit
def _segment_shrink_kernel(
    x_ptr, a_ptr, start_ptr, len_ptr, slot_ptr, y_ptr, K, R, stride_x, stride_as, stride_ar, stride_y,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
):
    segment = tl.program_id(0)
    start = tl.load(start_ptr + segment).to(tl.int64)
    length = tl.load(len_ptr + segment)
    slot = tl.load(slot_ptr + segment).to(tl.int64)
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)  # past the run's end: masked off
    rs = tl.arange(0, BLOCK_R)
    acc = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + (start + rows)[:, None] * stride_x + ks[None, :],
                    mask=(rows[:, None] < length) & (ks[None, :] < K), other=0.0)
        a_t = tl.load(a_ptr + slot * stride_as + rs[None, :] * stride_ar + ks[:, None],
                      mask=(rs[None, :] < R) & (ks[:, None] < K), other=0.0)
        acc = tl.dot(x, a_t, acc, input_precision=PRECISION)
    tl.store(y_ptr + (start + rows)[:, None] * stride_y + rs[None, :], acc,
             mask=(rows[:, None] < length) & (rs[None, :] < R))


@triton.jit
def _segment_expand_kernel(
    y_ptr, b_ptr, start_ptr, len_ptr, slot_ptr, out_ptr, N, R, stride_y, stride_bs, stride_bn, stride_out,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
):
    segment = tl.program_id(0)
    start = tl.load(start_ptr + segment).to(tl.int64)
    length = tl.load(len_ptr + segment)
    slot = tl.load(slot_ptr + segment).to(tl.int64)
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    ns = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    rs = tl.arange(0, BLOCK_R)
    y = tl.load(y_ptr + (start + rows)[:, None] * stride_y + rs[None, :],
                mask=(rows[:, None] < length) & (rs[None, :] < R), other=0.0)
    b_t = tl.load(b_ptr + slot * stride_bs + ns[None, :] * stride_bn + rs[:, None],
                  mask=(rs[:, None] < R) & (ns[None, :] < N), other=0.0)
    delta = tl.dot(y.to(b_t.dtype), b_t, input_precision=PRECISION)
    mask = (rows[:, None] < length) & (ns[None, :] < N)
    ptrs = out_ptr + (start + rows)[:, None] * stride_out + ns[None, :]
    base = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(ptrs, (base + delta).to(out_ptr.dtype.element_ty), mask=mask)
