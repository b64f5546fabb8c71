"""The W4A16 GEMV: one bfloat16 row x times a 4-bit W, read straight from the shared packed layout
(pagoda/kernels/w4a16_layout.py), so that it needs no copy of the weight of its own.

At one row (batch-1 decode) a layer's cost is reading its 4-bit weight. The packed words run along
N, so the lanes of a warp take adjacent output columns and each thread keeps its own column sums:
nothing crosses lanes until the end. A word's 8 nibbles become bfloat16 pairs in a few integer
instructions (each nibble or-ed into the mantissa of 128.0, then 128 + zero point subtracted, both
exact), which meet x's pairs in bfloat16 multiply-adds; each word's sum goes to float32.

Every program spans all of K, so the kernel fills the GPU only where N is wide: on an H100 it read
gate_up of the 8B shape (N 28,672) in 24.9 us against tinygemm's 32.3, while at N 4,096-6,144 it
lost to tinygemm (`fills_gpu` decides). Under TRITON_INTERPRET=1 the PTX is emulated in Triton."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from pagoda.kernels.device_info import num_sms
from pagoda.kernels.w4a16_layout import PACK

BLOCK_N = 32  # output columns a program
BLOCK_WORDS = 32  # packed rows (8 inputs each) an iteration
NUM_WARPS = 4
MIN_WAVES = 4  # programs per SM, at least, for the GEMV to beat tinygemm (H100, 8B shapes)

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
    x_pairs_ptr, qweight_ptr, scales_ptr, zeros_ptr, out_ptr, N, packed_rows,
    GROUP_WORDS: tl.constexpr, HAS_ZEROS: tl.constexpr, EMULATE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_WORDS: tl.constexpr,
):
    """out[n] = sum_k x[k] * W[n, k] for this program's BLOCK_N columns, over all of K."""
    ns = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = ns < N
    acc = tl.zeros((BLOCK_WORDS, BLOCK_N), dtype=tl.float32)
    for w0 in range(0, packed_rows, BLOCK_WORDS):
        ws = w0 + tl.arange(0, BLOCK_WORDS)
        w_ok = ws < packed_rows
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
    tl.store(out_ptr + ns, tl.sum(acc, axis=0).to(out_ptr.dtype.element_ty), mask=n_ok)


def fills_gpu(n: int, device: torch.device) -> bool:
    """Whether an N-wide layer gives the GEMV enough programs to beat tinygemm on `device`."""
    return triton.cdiv(n, BLOCK_N) >= MIN_WAVES * num_sms(device, on_cpu=1)


def w4a16_gemv(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, group_size: int
) -> torch.Tensor:
    """x [1, K] (bfloat16) @ W^T -> [1, N] for W in the packed layout without g_idx; group_size divides K
    and is a multiple of 8."""
    packed_rows, n = qweight.shape
    if x.shape != (1, packed_rows * PACK) or x.dtype != torch.bfloat16 or group_size % PACK:
        raise ValueError(f"w4a16_gemv takes one bfloat16 row of {packed_rows * PACK} inputs and groups of a "
                         f"multiple of {PACK}: got x {tuple(x.shape)} {x.dtype}, group_size {group_size}")
    out = torch.empty(1, n, dtype=x.dtype, device=x.device)
    _w4a16_gemv_kernel[(triton.cdiv(n, BLOCK_N),)](
        x.contiguous().view(torch.int32), qweight, scales, scales if zeros is None else zeros, out, n, packed_rows,
        GROUP_WORDS=group_size // PACK, HAS_ZEROS=zeros is not None,
        EMULATE=os.environ.get("TRITON_INTERPRET") == "1", BLOCK_N=BLOCK_N, BLOCK_WORDS=BLOCK_WORDS,
        num_warps=NUM_WARPS,
    )
    return out
