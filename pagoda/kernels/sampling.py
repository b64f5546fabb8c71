"""Sampling kernels for the GPU.

Greedy sampling in one pass over the logits, for the common case (every row greedy, no logit
processing, no top logprobs): each row's argmax, its first maximum as torch.argmax takes it, from
the logits in their own dtype, each row split across programs so that a few rows still keep every
SM reading.

Exponential noise with a seed per row, for random sampling: one launch for the batch, where a
torch generator per seeded request would cost a generator and a launch each."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pagoda.kernels.device_info import num_sms


# The split count follows the batch size: as a constant or a specialised argument it would compile
# the kernels again for new batch sizes mid-serving.
@triton.jit(do_not_specialize=["chunk", "num_splits"])
def _greedy_split_kernel(logits_ptr, max_ptr, arg_ptr, stride_row, vocab, chunk, num_splits, BLOCK: tl.constexpr):
    """Over one split of one row (columns [split * chunk, (split + 1) * chunk)): its max and the
    first column holding it."""
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    base = logits_ptr + row * stride_row
    lanes = tl.arange(0, BLOCK)
    lane_max = tl.full([BLOCK], float("-inf"), tl.float32)
    lane_arg = tl.zeros([BLOCK], tl.int32)
    end = tl.minimum((split + 1) * chunk, vocab)
    for start in tl.range(split * chunk, end, BLOCK):
        cols = start + lanes
        x = tl.load(base + cols, mask=cols < end, other=float("-inf")).to(tl.float32)
        lane_arg = tl.where(x > lane_max, cols, lane_arg)  # strictly greater: the first column wins
        lane_max = tl.maximum(lane_max, x)
    split_max = tl.max(lane_max, axis=0)
    out = row * num_splits + split
    tl.store(max_ptr + out, split_max)
    # Ties across lanes: the lowest column, as torch.argmax picks.
    tl.store(arg_ptr + out, tl.min(tl.where(lane_max == split_max, lane_arg, vocab), axis=0))


@triton.jit(do_not_specialize=["num_splits"])
def _greedy_combine_kernel(max_ptr, arg_ptr, tokens_ptr, vocab, num_splits, MAX_SPLITS: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    lanes = tl.arange(0, MAX_SPLITS)
    valid = lanes < num_splits
    splits = row * num_splits + lanes
    split_max = tl.load(max_ptr + splits, mask=valid, other=float("-inf"))
    row_max = tl.max(split_max, axis=0)
    # Splits are in column order: the lowest column among the maxima is the first one.
    token = tl.min(tl.where(split_max == row_max, tl.load(arg_ptr + splits, mask=valid, other=vocab), vocab), axis=0)
    tl.store(tokens_ptr + row, token.to(tl.int64))


_GREEDY_BLOCK = 2048
_GREEDY_MAX_SPLITS = 64


def greedy_sample(logits: torch.Tensor) -> torch.Tensor:
    """The argmax [rows] int64 of logits [rows, vocab], any float dtype, last dim contiguous. Each
    row is split across programs so that a batch of any size keeps every SM reading (one program
    per row read 256 rows of a 128k vocabulary at 1 TB/s on an H200, one row at a fraction of that)."""
    rows, vocab = logits.shape
    tokens = torch.empty(rows, dtype=torch.int64, device=logits.device)
    if not rows:
        return tokens
    blocks = triton.cdiv(vocab, _GREEDY_BLOCK)
    # About four programs per SM, a block or more each.
    splits = min(triton.cdiv(4 * num_sms(logits.device), rows), blocks, _GREEDY_MAX_SPLITS)
    chunk = triton.cdiv(blocks, splits) * _GREEDY_BLOCK
    partial_max = torch.empty(rows, splits, dtype=torch.float32, device=logits.device)
    partial_arg = torch.empty(rows, splits, dtype=torch.int32, device=logits.device)
    _greedy_split_kernel[(rows, splits)](
        logits, partial_max, partial_arg, logits.stride(0), vocab, chunk, splits, BLOCK=_GREEDY_BLOCK
    )
    _greedy_combine_kernel[(rows,)](partial_max, partial_arg, tokens, vocab, splits, MAX_SPLITS=_GREEDY_MAX_SPLITS)
    return tokens


@triton.jit
def _exponential_kernel(seeds_ptr, noise_ptr, stride_row, vocab, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    uniform = tl.rand(tl.load(seeds_ptr + row), cols)  # Philox: a function of (seed, column) alone
    # -log(U) ~ Exp(1). U = 0 gives +inf (odds 0); U rounds to 1.0 in float32 now and then, and a
    # noise of 0 would make a masked token's odds 0 / 0 = NaN, which wins an argmax.
    tl.store(noise_ptr + row * stride_row + cols, tl.maximum(-tl.log(uniform), 1.1754944e-38), mask=cols < vocab)


def exponential_noise(seeds: torch.Tensor, vocab: int) -> torch.Tensor:
    """[rows, vocab] float32 Exp(1) noise; row r depends on seeds[r] (int64, on the device) only."""
    noise = torch.empty(seeds.shape[0], vocab, dtype=torch.float32, device=seeds.device)
    if seeds.shape[0]:
        block = 4096
        _exponential_kernel[(seeds.shape[0], triton.cdiv(vocab, block))](seeds, noise, noise.stride(0), vocab, BLOCK=block)
    return noise
