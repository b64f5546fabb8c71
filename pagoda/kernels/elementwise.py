"""Triton kernels for the memory-bound work between a decoder layer's matmuls: RMSNorm fused with
the residual add, rotary embedding applied in place, SiLU-and-mul, and the per-token FP8
quantization of a matmul's input. Each reads its inputs once
and writes once, where the torch versions make a round trip to memory per elementwise op. The norm
and SiLU-and-mul can also quantize what they write for the FP8 matmul that reads it (`fp8_out`),
with the result the quantization kernel gives on their output and without its pass over memory.

They round where the torch references (pagoda/layers) round, so that outputs match them bit for
bit or within one unit in the last place."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _static_scale(scale_ptr, STATIC: tl.constexpr):
    """The one scale at scale_ptr of a static quantization (else 1.0, unread). A kernel loads it with its
    row: loaded after a reduction, it would wait for a trip to memory of its own."""
    if STATIC:
        return tl.load(scale_ptr)
    else:
        return 1.0


@triton.jit
def _store_fp8_row(y, mask, q_ptrs, scale_ptr, row, fp8_max, static_scale, STATIC: tl.constexpr):
    """Quantize one row y (float32, whole in this program) to fp8 at q_ptrs: by its own largest
    magnitude (scale stored at scale_ptr[row]) or, STATIC, by `static_scale` (_static_scale's).
    The row is multiplied by the scale's reciprocal (rounded as torch's 1 / scale), as vLLM's
    kernels do: a rounded division per value made SiLU-and-mul's 16,384 prefill rows of the 8B
    shape take 465-468 us on an H100 against 377-379 (3.1 TB/s)."""
    if STATIC:
        scale = static_scale
    else:
        scale = tl.maximum(tl.max(tl.abs(y), axis=0), 1e-12) / fp8_max  # within an ulp of torch's
        tl.store(scale_ptr + row, scale)
    q = tl.clamp(y * tl.math.div_rn(1.0, scale), -fp8_max, fp8_max)
    tl.store(q_ptrs, q.to(q_ptrs.dtype.element_ty), mask=mask)


@triton.jit
def _rms_norm_kernel(
    x_ptr, residual_ptr, weight_ptr, out_ptr, scale_ptr,
    stride_x, stride_r, stride_o, n_cols, eps, fp8_max,
    HAS_RESIDUAL: tl.constexpr, CAST_BEFORE_SCALE: tl.constexpr, BLOCK: tl.constexpr,
    FP8_OUT: tl.constexpr, STATIC: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    # Loaded with x, not after the sum of squares waits for it: one trip to memory, not two.
    w = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    static_scale = _static_scale(scale_ptr, STATIC)
    if HAS_RESIDUAL:
        # The sum is rounded to the model dtype before it is normalised, as x + residual is in torch.
        x = (x.to(tl.float32) + tl.load(residual_ptr + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32))
        x = x.to(residual_ptr.dtype.element_ty)
        tl.store(residual_ptr + row * stride_r + cols, x, mask=mask)
    xf = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / n_cols + eps)
    normed = xf * rstd
    if CAST_BEFORE_SCALE:  # Llama's reference rounds the normalised x before the weight; Gemma's after
        normed = normed.to(x.dtype).to(tl.float32)
    y = (normed * w).to(x.dtype)
    if FP8_OUT:  # what fp8_quantize_rows makes of the model-dtype output
        _store_fp8_row(y.to(tl.float32), mask, out_ptr + row * stride_o + cols, scale_ptr, row, fp8_max,
                       static_scale, STATIC)
    else:
        tl.store(out_ptr + row * stride_o + cols, y, mask=mask)


# An fp8 output: (the float8 dtype, one float32 scale for every row, or None: each row's own).
Fp8Quant = tuple[torch.dtype, "torch.Tensor | None"]


def _row_warps(block: int) -> int:
    """Warps for a program that holds a whole row of `block` elements: a row of 8,192 or more held
    by 4 warps spills (H200, 8,192 x 14,336 quantized: 207 us with 4, 141 with 8); SiLU-and-mul
    writing fp8 for 8,192 x 14,336 took 378 us with 4 warps, 267 with 8, 227 with 16
    (`scripts/bench_elementwise.py --fp8`)."""
    return 16 if block >= 16384 else 8 if block >= 8192 else 4


def _fp8_output(rows: int, x: torch.Tensor, fp8_out: Fp8Quant) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The quantized output's buffers [rows, x's last dim] in fp8 and its scales [rows, 1], and the fp8 maximum."""
    fp8_dtype, static_scale = fp8_out
    q = torch.empty(rows, x.shape[-1], dtype=fp8_dtype, device=x.device)
    if static_scale is None:
        scale = torch.empty(rows, 1, dtype=torch.float32, device=x.device)
    else:
        scale = static_scale.reshape(1, 1).expand(rows, 1).contiguous()
    return q, scale, torch.finfo(fp8_dtype).max


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
    cast_before_scale: bool = True, fp8_out: Fp8Quant | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """norm(x) * weight over the last dim; with `residual`, normalises x + residual and stores that
    sum into `residual` in place (it becomes the next residual). x: [..., N], rows contiguous.
    cast_before_scale: round norm(x) to x's dtype before the weight scales it (Llama), or only the
    product (Gemma). fp8_out: return (fp8 [rows, N], float32 scales [rows, 1]) instead, as
    fp8_quantize_rows gives for the output."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if fp8_out is None:
        out, scale, fp8_max = torch.empty_like(x2), x2, 0.0  # scale: not read
    else:
        out, scale, fp8_max = _fp8_output(x2.shape[0], x2, fp8_out)
    r2 = x2 if residual is None else residual.view(-1, shape[-1])
    block = triton.next_power_of_2(shape[-1])
    _rms_norm_kernel[(x2.shape[0],)](
        x2, r2, weight, out, scale, x2.stride(0), r2.stride(0), out.stride(0), shape[-1], eps, fp8_max,
        HAS_RESIDUAL=residual is not None, CAST_BEFORE_SCALE=cast_before_scale, BLOCK=block,
        FP8_OUT=fp8_out is not None, STATIC=fp8_out is not None and fp8_out[1] is not None,
        num_warps=_row_warps(block),
    )
    return out.view(shape) if fp8_out is None else (out, scale)


@triton.jit
def _rotate_half(ptr1, x1, x2, cos, sin, mask, HALF: tl.constexpr):
    """Store the rotation of halves x1 (at ptr1) and x2 (at ptr1 + HALF)."""
    x1f, x2f = x1.to(tl.float32), x2.to(tl.float32)
    tl.store(ptr1, (x1f * cos - x2f * sin).to(x1.dtype), mask=mask)
    tl.store(ptr1 + HALF, (x2f * cos + x1f * sin).to(x1.dtype), mask=mask)


@triton.jit
def _rotary_kernel(
    q_ptr, k_ptr, cos_sin_ptr, positions_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_cs,
    num_q_heads, num_k_heads,
    HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    d = tl.arange(0, BLOCK_HALF)
    d_mask = d < HALF
    heads = tl.arange(0, BLOCK_H)
    q_mask = (heads < num_q_heads)[:, None] & d_mask[None, :]
    k_mask = (heads < num_k_heads)[:, None] & d_mask[None, :]
    q1_ptr = q_ptr + token * stride_qt + heads[:, None] * stride_qh + d[None, :]
    k1_ptr = k_ptr + token * stride_kt + heads[:, None] * stride_kh + d[None, :]
    # q and k are loaded while the position, then its cos and sin, come: two trips to memory, not
    # three (a batch-1 decode step runs this once a layer, and waits for it).
    q1 = tl.load(q1_ptr, mask=q_mask, other=0.0)
    q2 = tl.load(q1_ptr + HALF, mask=q_mask, other=0.0)
    k1 = tl.load(k1_ptr, mask=k_mask, other=0.0)
    k2 = tl.load(k1_ptr + HALF, mask=k_mask, other=0.0)
    pos = tl.load(positions_ptr + token)
    cos = tl.load(cos_sin_ptr + pos * stride_cs + d, mask=d_mask, other=0.0)[None, :]
    sin = tl.load(cos_sin_ptr + pos * stride_cs + HALF + d, mask=d_mask, other=0.0)[None, :]
    _rotate_half(q1_ptr, q1, q2, cos, sin, q_mask, HALF)
    _rotate_half(k1_ptr, k1, k2, cos, sin, k_mask, HALF)


def rotary_inplace(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin: torch.Tensor) -> None:
    """Rotate q [T, Hq, D] and k [T, Hk, D] in place ("rotate half" layout) over their first R
    dims; cos_sin is [rows, R] float32, cos in the first half, gathered at `positions`. Heads and
    dims must be contiguous."""
    num_tokens, num_q_heads, _ = q.shape
    if num_tokens == 0:
        return
    half = cos_sin.shape[1] // 2
    _rotary_kernel[(num_tokens,)](
        q, k, cos_sin, positions,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos_sin.stride(0),
        num_q_heads, k.shape[1],
        HALF=half, BLOCK_H=triton.next_power_of_2(max(num_q_heads, k.shape[1])),
        BLOCK_HALF=triton.next_power_of_2(half),
    )


@triton.jit
def _silu_and_mul_kernel(
    x_ptr, out_ptr, scale_ptr, stride_x, stride_o, n_cols, fp8_max,
    BLOCK: tl.constexpr, FP8_OUT: tl.constexpr, STATIC: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + n_cols + cols, mask=mask, other=0.0)
    static_scale = _static_scale(scale_ptr, STATIC)
    # silu is rounded to the model dtype before the product, as F.silu(gate) * up rounds it.
    act = (gate / (1.0 + tl.exp(-gate))).to(up.dtype).to(tl.float32)
    y = (act * up.to(tl.float32)).to(up.dtype)
    if FP8_OUT:  # one program holds the whole row
        _store_fp8_row(y.to(tl.float32), mask, out_ptr + row * stride_o + cols, scale_ptr, row, fp8_max,
                       static_scale, STATIC)
    else:
        tl.store(out_ptr + row * stride_o + cols, y, mask=mask)


def silu_and_mul(
    x: torch.Tensor, fp8_out: Fp8Quant | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """silu(x[..., :N]) * x[..., N:] for x [..., 2N]. fp8_out: return (fp8 [rows, N], float32 scales
    [rows, 1]) instead, as fp8_quantize_rows gives for the output."""
    n = x.shape[-1] // 2
    x2 = x.reshape(-1, x.shape[-1])
    rows = x2.shape[0]
    if fp8_out is None:
        out, scale, fp8_max = torch.empty(rows, n, dtype=x.dtype, device=x.device), x2, 0.0  # scale: not read
        block = min(1024, triton.next_power_of_2(n))
    else:
        out, scale, fp8_max = _fp8_output(rows, x2[:, :n], fp8_out)
        block = triton.next_power_of_2(n)  # a row's scale needs the whole row
    if rows:
        _silu_and_mul_kernel[(rows, triton.cdiv(n, block))](
            x2, out, scale, x2.stride(0), out.stride(0), n, fp8_max, BLOCK=block,
            FP8_OUT=fp8_out is not None, STATIC=fp8_out is not None and fp8_out[1] is not None,
            num_warps=_row_warps(block),
        )
    return out.view(*x.shape[:-1], n) if fp8_out is None else (out, scale)


@triton.jit
def _fp8_quantize_rows_kernel(
    x_ptr, q_ptr, scale_ptr, stride_x, stride_q, n_cols, fp8_max,
    STATIC: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    _store_fp8_row(x, mask, q_ptr + row * stride_q + cols, scale_ptr, row, fp8_max, _static_scale(scale_ptr, STATIC),
                   STATIC)


def fp8_quantize_rows(
    x: torch.Tensor, fp8_dtype: torch.dtype, static_scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x * (1 / scale) in fp8, float32 scale [M, 1]) for x [M, K] in one pass over x: the scale is each
    row's largest magnitude over the fp8 maximum, or `static_scale` (one float32 value) for every
    row. The torch sequence (abs, amax, divide, clamp, cast) makes six passes with fp32
    intermediates, which cost more than the fp8 GEMM saves on a prefill."""
    q, scale, fp8_max = _fp8_output(x.shape[0], x, (fp8_dtype, static_scale))
    if x.shape[0]:
        block = triton.next_power_of_2(x.shape[1])
        _fp8_quantize_rows_kernel[(x.shape[0],)](
            x, q, scale, x.stride(0), q.stride(0), x.shape[1], fp8_max,
            STATIC=static_scale is not None, BLOCK=block, num_warps=_row_warps(block),
        )
    return q, scale
