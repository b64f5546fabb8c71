"""Greedy steps on the CPU read a float32 LM head's weight at half the bytes, and still take the
float32 head's argmax.

A small model's LM head is a large share of a CPU decode step: the default model's is 49,152 x
576 float32 (113 MB), ~5 ms of a ~19 ms compiled step at one stream. When a step only takes
each row's argmax (greedy rows with no logprobs and nothing that changes logits before the
argmax), `ScreenedHead` computes every logit from a float16 copy of the weight through fbgemm's
float16 GEMM (float32 activations and sums; 1.6 against 3.4 ms for that head at one row), then
recomputes from the float32 weight each logit that could still be the row's maximum:

    |exact_n - approx_n| <= b = 2^-9 |x| max_m |w_m| + 2^-24 |x|_1

(float16 rounds each weight within 2^-11 of itself, Cauchy-Schwarz bounds the sum, and the margin
covers both GEMMs' float32 sums and weights in float16's subnormal range). A logit with approx_n
< max(approx) - 2b is below the row's true maximum; the others are recomputed exactly, so the
argmax of the returned logits is the float32 head's (up to the order of float32 sums, as between
any two GEMMs). The rest of each row is within b, for whatever reads logits besides the argmax
(the sampled token's logprob, which nobody asked for). One bound a row, not one a logit: each
pass over [rows, vocab] costs as much as the candidates a looser bound lets through.

A head held in Q8_0 form (GGUF's, pagoda/layers/q8_rows.py) screens every step the same way; where
the CPU has AVX512-VNNI or AVX2 through `Q8ScreenedHead`, which reads the int8 rows themselves with Pagoda's
C matmul (no float16 copy), its bound typically ~10x tighter."""

from __future__ import annotations

import torch

from pagoda.kernels import cpu_native
from pagoda.layers.q8_rows import Q8Rows

_RELATIVE = 2.0**-9
_ABSOLUTE = 2.0**-24
_FP16_MAX = 65504.0
_INT16_STEP = 2.0**-15
_CHUNK_BLOCKS = 256  # blocks of 16 rows summed at once for the bound: small temporaries


class ScreenedHead:
    """A float32 LM head weight [V, K] as float16 in fbgemm's packed layout, with each row's norm."""

    def __init__(self, weight: torch.Tensor) -> None:
        self.packed = torch.ops.quantized.linear_prepack_fp16(weight, None)
        self.max_row_norm = float(torch.linalg.vector_norm(weight, dim=1).max())

    @staticmethod
    def serves(weight: torch.Tensor) -> bool:
        """A float32 CPU weight that fits float16's range, where torch has fbgemm (x86)."""
        return (
            weight.device.type == "cpu" and weight.dtype == torch.float32
            and "fbgemm" in torch.backends.quantized.supported_engines
            and bool(weight.abs().max() <= _FP16_MAX)
        )

    def logits(self, hidden: torch.Tensor, weight: torch.Tensor | Q8Rows) -> torch.Tensor:
        """hidden [M, K] -> logits [M, V] whose argmax per row is that of hidden @ weight.T, from
        the float32 weight this screen was built from (or its rows in Q8_0 form: exactly its values)."""
        approx = torch.ops.quantized.linear_dynamic_fp16(hidden, self.packed)
        bound = torch.linalg.vector_norm(hidden, dim=1) * (_RELATIVE * self.max_row_norm)
        bound += hidden.abs().sum(dim=1) * _ABSOLUTE
        return _exact_near_the_max(approx, bound, hidden, weight)


class Q8ScreenedHead:
    """Q8_0 rows' logits through Pagoda's C matmul (pagoda/kernels/cpu_native.py, AVX512-VNNI or AVX2): the
    rows read as they are held (31.5 MB for the default model's head, where ScreenedHead's float16
    copy is another 56 MB), each row of activations in int16 steps of s = max|x| / 32767:

        |exact_n - approx_n| <= b = 2^-15 max|x| max_m |w_m|_1

    (each activation within 0.51 s of its step, s <= 2^-15 max|x| (1 + 2^-15); the float32 sums of
    the 32-value blocks' int32 products within ~2^-19 of |w|_1 max|x|), then as ScreenedHead."""

    def __init__(self, rows: Q8Rows) -> None:
        # Each block's rows' sums of |values| (in int16: 32 x 128 at most), times their scales.
        self.max_row_l1 = max(
            float((values.to(torch.int16).abs().sum(dim=(2, 4)) * scales).sum(dim=1).max())
            for values, scales in zip(rows.blocks.split(_CHUNK_BLOCKS), rows.block_scales.split(_CHUNK_BLOCKS))
        )

    def logits(self, hidden: torch.Tensor, rows: Q8Rows) -> torch.Tensor:
        """hidden [M, K] -> logits [M, V] whose argmax per row is that of hidden @ W.T exactly."""
        hidden = hidden.float().contiguous()
        logits = cpu_native.q8_matmul(hidden, rows.blocks, rows.block_scales, rows.num_rows)
        bound = hidden.abs().amax(dim=1) * (_INT16_STEP * self.max_row_l1)
        # As _exact_near_the_max, in one C pass a row (its six torch ops took 0.7 ms at one row).
        cpu_native.q8_exact_near_the_max(hidden, rows.blocks, rows.block_scales, bound, logits)
        return logits


def _exact_near_the_max(
    approx: torch.Tensor, bound: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor | Q8Rows
) -> torch.Tensor:
    """approx [M, V], each logit within bound [M] of the exact one, with every logit that could be
    its row's maximum (within twice the bound of the row's largest) recomputed exactly."""
    floor = approx.amax(dim=1) - 2 * bound
    rows, cols = torch.nonzero(approx >= floor[:, None], as_tuple=True)
    approx[rows, cols] = (hidden[rows] * weight[cols]).sum(dim=1)
    return approx
