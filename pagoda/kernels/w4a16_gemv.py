"""The W4A16 GEMV: one bfloat16 row x times a 4-bit W, read straight from the shared packed layout
(pagoda/kernels/w4a16_layout.py), so that it needs no copy of the weight of its own.

At one row (batch-1 decode) a layer's cost is reading its 4-bit weight. The packed words run along
N, so the lanes of a warp take adjacent output columns and each thread keeps its own column sums:
nothing crosses lanes until the end. A word's 8 nibbles become bfloat16 pairs in a few integer
instructions (each nibble or-ed into the mantissa of 128.0, then 128 + zero point subtracted, both
exact), which meet x's pairs in bfloat16 multiply-adds; each word's sum goes to float32.

A layer too narrow to give every SM several column blocks needs more programs. Where K is short
(`NARROW_MAX_WORDS`), or the layer is wide enough for NARROW_MIN_WAVES of them a SM, its programs
take half as many columns and twice the packed rows an iteration, with twice the warps. Otherwise K
is split as well: each program stores its slice's float32 sums, and the last program of a column
block to finish (an atomic count it then resets, so the next launch and a CUDA graph's replays find
it zeroed) adds them up. That last step costs a slice's worth of latency, which a short K's loop
does not win back, nor does a layer whose narrow tiles alone fill the SMs. On an H100, from DRAM
(scripts/sweep_w4a16_gemv.py), layers took (us, against tinygemm's): the 8B's gate_up 25.5 (33.3),
down 15.5 in 7 slices of K (18.1), qkv 8.2 in NARROW tiles (9.8; 9.5 split 4 in WIDE ones); the 70B's qkv,
o_proj and down 19.0, 15.9 and 48.0 in NARROW tiles over all of K (24.0, 20.2, 63.3), against
21.8, 20.8 and 60.6 split in WIDE ones. The 8B's o_proj (6.7) ties tinygemm, so layers below
`MIN_WEIGHTS` keep tinygemm (`pays`). Under TRITON_INTERPRET=1 the PTX is emulated in Triton."""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from pagoda.kernels.device_info import fills, k_slices, k_splits, num_sms
from pagoda.kernels.w4a16_layout import PACK


class Tile(NamedTuple):
    columns: int  # output columns a program
    words: int  # packed rows (8 inputs each) an iteration
    warps: int


WIDE = Tile(32, 64, 4)
NARROW = Tile(16, 128, 8)  # the same words an iteration, over twice the programs
NARROW_MAX_WORDS = 512  # packed rows (a K of 4,096) up to which a narrow layer takes NARROW tiles unsplit
MIN_WAVES = 4  # programs per SM the K split aims for
NARROW_MIN_WAVES = 3  # NARROW programs per SM from which a long K takes them unsplit (70B: 3.9; 8B down: 1.9)
MAX_SPLIT = 8  # slices of K, at most
MIN_WEIGHTS = 20 << 20  # a layer's weights (N x K) from which the GEMV beats tinygemm (H100, 8B shapes)

# Nibble pair i of a word (bits 4i and 16 + 4i: inputs 8w + i and 8w + 4 + i) or-ed into the
# mantissas of a pair of 128.0s gives (128 + v) exactly; less the pair (128 + z), v - z.
_DEQUANTIZE_ASM = tl.constexpr("""
{
.reg .b32 s;
lop3.b32 $0, $4, 0x000F000F, 0x43004300, 0xEA;
shr.u32 s, $4, 4;
lop3.b32 $1, s, 0x000F000F, 0x43004300, 0xEA;
shr.u32 s, $4, 8;
lop3.b32 $2, s, 0x000F000F, 0x43004300, 0xEA;
shr.u32 s, $4, 12;
lop3.b32 $3, s, 0x000F000F, 0x43004300, 0xEA;
sub.rn.bf16x2 $0, $0, $5;
sub.rn.bf16x2 $1, $1, $5;
sub.rn.bf16x2 $2, $2, $5;
sub.rn.bf16x2 $3, $3, $5;
}
""")

# x's pairs (x[2j], x[2j + 1]) regrouped as the nibble pairs meet them: (x[i], x[4 + i]).
_REGROUP_ASM = tl.constexpr("prmt.b32 $0, $2, $3, 0x5410; prmt.b32 $1, $2, $3, 0x7632;")

# The word's 8 products, 4 in each half of a bfloat16 pair, the halves summed in float32.
_WORD_DOT_ASM = tl.constexpr("""
{
.reg .b32 a, lo, hi;
mul.rn.bf16x2 a, $1, $5;
fma.rn.bf16x2 a, $2, $6, a;
fma.rn.bf16x2 a, $3, $7, a;
fma.rn.bf16x2 a, $4, $8, a;
shl.b32 lo, a, 16;
and.b32 hi, a, 0xFFFF0000;
add.f32 $0, lo, hi;
}
""")


@triton.jit
def _halves(pairs):
    """A tensor of int32 bfloat16 pairs as float32 (low halves, high halves)."""
    return (pairs << 16).to(tl.float32, bitcast=True), (pairs & -65536).to(tl.float32, bitcast=True)


@triton.jit
def _emulated_word_dots(words, zero, p0, p1, p2, p3):
    """What the PTX computes, in float32 (the interpreter runs no PTX): pair p_j holds inputs 2j, 2j + 1."""
    dots = tl.zeros(words.shape, tl.float32)
    for j in tl.static_range(4):
        p = p0 if j == 0 else p1 if j == 1 else p2 if j == 2 else p3
        lo, hi = _halves(p)
        dots += (((words >> (8 * j)) & 0xF) - zero).to(tl.float32) * lo
        dots += (((words >> (8 * j + 4)) & 0xF) - zero).to(tl.float32) * hi
    return dots


@triton.jit
def _word_dots(words, zero, p0, p1, p2, p3, EMULATE: tl.constexpr):
    """Each word's 8 nibbles less the zero point, dotted with x's 8 inputs (4 int32 bfloat16 pairs)."""
    if EMULATE:
        return _emulated_word_dots(words, zero, p0, p1, p2, p3)
    q0, q1 = tl.inline_asm_elementwise(_REGROUP_ASM, "=r,=r,r,r", [p0, p2], dtype=(tl.int32, tl.int32),
                                       is_pure=True, pack=1)
    q2, q3 = tl.inline_asm_elementwise(_REGROUP_ASM, "=r,=r,r,r", [p1, p3], dtype=(tl.int32, tl.int32),
                                       is_pure=True, pack=1)
    t0, t1, t2, t3 = tl.inline_asm_elementwise(
        _DEQUANTIZE_ASM, "=r,=r,=r,=r,r,r", [words, zero * 0x10001 + 0x43004300], dtype=(tl.int32,) * 4,
        is_pure=True, pack=1)
    bits = tl.inline_asm_elementwise(
        _WORD_DOT_ASM, "=r,r,r,r,r,r,r,r,r", [t0, t1, t2, t3, q0, q1, q2, q3], dtype=tl.int32, is_pure=True, pack=1)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _w4a16_gemv_kernel(
    x_pairs_ptr, qweight_ptr, scales_ptr, zeros_ptr, out_ptr, partials_ptr, counts_ptr, N, packed_rows,
    words_per_split,
    GROUP_WORDS: tl.constexpr, HAS_ZEROS: tl.constexpr, EMULATE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_WORDS: tl.constexpr, SPLIT: tl.constexpr, SPLIT_POW2: tl.constexpr,
):
    """out[n] = sum_k x[k] * W[n, k] for this program's BLOCK_N columns, over its slice of K."""
    block = tl.program_id(0)
    ns = block * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = ns < N
    first = tl.program_id(1) * words_per_split
    end = tl.minimum(first + words_per_split, packed_rows)
    acc = tl.zeros((BLOCK_WORDS, BLOCK_N), dtype=tl.float32)
    for w0 in range(first, end, BLOCK_WORDS):
        ws = w0 + tl.arange(0, BLOCK_WORDS)
        w_ok = ws < end
        ok = w_ok[:, None] & n_ok[None, :]
        words = tl.load(qweight_ptr + ws[:, None].to(tl.int64) * N + ns[None, :], mask=ok, other=0)
        group_offs = (ws // GROUP_WORDS)[:, None] * N + ns[None, :]
        scale = tl.load(scales_ptr + group_offs, mask=ok, other=0).to(tl.float32)
        if HAS_ZEROS:
            zero = tl.load(zeros_ptr + group_offs, mask=ok, other=0).to(tl.int32)
        else:
            zero = tl.full((BLOCK_WORDS, BLOCK_N), 8, tl.int32)
        pairs = x_pairs_ptr + 4 * ws[:, None]  # x's 8 inputs of each word as 4 int32 pairs
        p0 = tl.load(pairs, mask=w_ok[:, None], other=0)
        p1 = tl.load(pairs + 1, mask=w_ok[:, None], other=0)
        p2 = tl.load(pairs + 2, mask=w_ok[:, None], other=0)
        p3 = tl.load(pairs + 3, mask=w_ok[:, None], other=0)
        acc += _word_dots(words, zero, p0, p1, p2, p3, EMULATE) * scale
    sums = tl.sum(acc, axis=0)
    if SPLIT == 1:
        tl.store(out_ptr + ns, sums.to(out_ptr.dtype.element_ty), mask=n_ok)
    else:
        tl.store(partials_ptr + tl.program_id(1) * N + ns, sums, mask=n_ok)
        tl.debug_barrier()  # all of the block's sums stored before the count says so
        if tl.atomic_add(counts_ptr + block, 1, sem="acq_rel") == SPLIT - 1:
            slices = tl.arange(0, SPLIT_POW2)
            parts = tl.load(partials_ptr + slices[:, None] * N + ns[None, :], cache_modifier=".cg",
                            mask=(slices < SPLIT)[:, None] & n_ok[None, :], other=0.0)
            tl.store(out_ptr + ns, tl.sum(parts, axis=0).to(out_ptr.dtype.element_ty), mask=n_ok)
            tl.atomic_xchg(counts_ptr + block, 0)


def takes(x: torch.Tensor, group_size: int) -> bool:
    """Whether the kernel runs x [rows, K] with these groups: one bfloat16 row, groups of whole words."""
    return x.shape[0] == 1 and x.dtype == torch.bfloat16 and group_size % PACK == 0


def pays(n: int, k: int) -> bool:
    """Whether the GEMV beats tinygemm on an N x K layer."""
    return n * k >= MIN_WEIGHTS


def launch(n: int, packed_rows: int, device: torch.device) -> tuple[Tile, int, int]:
    """(the tile, packed rows a program reads, slices of K): all of K in WIDE tiles where their column
    blocks fill the SMs; else all of K in NARROW tiles where K is short or they make NARROW_MIN_WAVES a SM;
    else slices of whole WIDE tiles making the programs MIN_WAVES a SM (MAX_SPLIT slices at most)."""
    wide_tiles = triton.cdiv(n, WIDE.columns)
    if fills(wide_tiles, MIN_WAVES, device):
        return WIDE, packed_rows, 1
    if packed_rows <= NARROW_MAX_WORDS or fills(triton.cdiv(n, NARROW.columns), NARROW_MIN_WAVES, device):
        return NARROW, packed_rows, 1
    return WIDE, *k_slices(packed_rows, k_splits(wide_tiles, MIN_WAVES, MAX_SPLIT, device), WIDE.words)


_WORKSPACES: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def _workspace(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The split launches' float32 partial sums and zeroed counts on `device`, sized once for any layer
    that splits (fewer than MIN_WAVES blocks a SM, MAX_SPLIT slices): one set serves every layer, as
    launches on a stream run one after another. A CUDA graph keeps what it captured, so they are
    made once, outside capture (a one-row graph runs eagerly first: worker/cuda_graphs.EAGER_RUN_TOKENS)."""
    if device not in _WORKSPACES:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("w4a16_gemv's workspace is made by an eager call before CUDA graph capture")
        blocks = MIN_WAVES * num_sms(device, on_cpu=1)
        _WORKSPACES[device] = (torch.empty(MAX_SPLIT * blocks * WIDE.columns, dtype=torch.float32, device=device),
                               torch.zeros(blocks, dtype=torch.int32, device=device))
    return _WORKSPACES[device]


def w4a16_gemv(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, group_size: int
) -> torch.Tensor:
    """x [1, K] (bfloat16) @ W^T -> [1, N] for W in the packed layout without g_idx; group_size divides K
    and is a multiple of 8."""
    packed_rows, n = qweight.shape
    if not takes(x, group_size) or x.shape != (1, packed_rows * PACK):
        raise ValueError(f"w4a16_gemv takes one bfloat16 row of {packed_rows * PACK} inputs and groups of a "
                         f"multiple of {PACK}: got x {tuple(x.shape)} {x.dtype}, group_size {group_size}")
    tile, words_per_split, split = launch(n, packed_rows, x.device)
    return gemv_at(x, qweight, scales, zeros, group_size, tile, words_per_split, split, _workspace(x.device))


def gemv_at(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, group_size: int,
    tile: Tile, words_per_split: int, split: int, workspace: tuple[torch.Tensor, torch.Tensor],
) -> torch.Tensor:
    """The kernel in `tile`s over `split` slices of `words_per_split` packed rows, a split's partial sums and
    counts in `workspace`: as `launch` picks them (w4a16_gemv), or as a sweep tries them
    (scripts/sweep_w4a16_gemv.py). The arguments are w4a16_gemv's, unchecked."""
    packed_rows, n = qweight.shape
    out = torch.empty(1, n, dtype=x.dtype, device=x.device)
    _w4a16_gemv_kernel[(triton.cdiv(n, tile.columns), split)](
        x.contiguous().view(torch.int32), qweight, scales, scales if zeros is None else zeros, out, *workspace,
        n, packed_rows, words_per_split,
        GROUP_WORDS=group_size // PACK, HAS_ZEROS=zeros is not None,
        EMULATE=os.environ.get("TRITON_INTERPRET") == "1", BLOCK_N=tile.columns, BLOCK_WORDS=tile.words,
        SPLIT=split, SPLIT_POW2=triton.next_power_of_2(split), num_warps=tile.warps,
    )
    return out
