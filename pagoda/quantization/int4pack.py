"""Torch's own int4 weight-only GEMMs behind one packed weight (`Int4Pack`), for every 4-bit
format on both devices: tinygemm on CUDA (`torch._weight_int4pack_mm`, the kernel gpt-fast uses)
and its CPU counterpart (`aten._weight_int4pack_mm_for_cpu`, AVX2/AVX-512). Both read 4-bit
values q in 0..15 with a scale and a float zero per group of inputs and output column,
W = (q - 8) * scale + zero, which maps each format: GGUF's Q4_0/Q4_1/Q4_K
(pagoda/quantization/gguf.py) and the W4A16 formats' integer zero points z, zero = (8 - z) * scale
(pagoda/quantization/w4a16.py). Plain torch: the CPU imports it without Triton.

Both kernels run in bfloat16 (scales and zeros stored so, fp32 sums). On CUDA they serve bf16
models only; on the CPU every model dtype, float32 included, its activations cast to bfloat16 and
the product cast back: with float32 or float16 inputs the CPU kernel runs a scalar loop, 12-40x
slower than with bfloat16 and, at 16 rows, slower than dequantizing the weight for a float32
matmul (scripts/bench_int4_cpu.py). So float32 models give up float32's exactness in these layers
for bfloat16's rounding (2**-9 relative), a small fraction of what the 4 bits themselves cost:
the default model as AWQ round-to-nearest has perplexity 24.410 through the kernel and 24.425
exactly (22.018 unquantized), and decodes one stream 21x faster than through the reference
(docs/quantization.md, "On the CPU"). The exact float32 path is the torch reference that layers
the kernels refuse fall back to (act-order, group sizes or widths); the tests check each
format's decoding against it exactly.

On a CPU with AVX512-VNNI or AVX2, Pagoda's own C matmul (`NativeInt4`, pagoda/kernels/cpu_native.py)
takes the place of torch's there: float16 scales, activations in int16 per 32 inputs (closer to
float32 than bfloat16 is), 1.6-2.2x torch's over a decode step of the default model's layers
(docs/benchmarks.md, "CPU, session 27")."""

from __future__ import annotations

import torch
from torch import nn

from pagoda.kernels import cpu_native

# Both kernels' group sizes; a layer's larger groups (per-channel scales too) that one of these
# divides are served by repeating each scale over its sub-groups.
GROUP_SIZES = (32, 64, 128, 256)
# tinygemm's packing: K a multiple of 16 x its inner K tiles, N of 8. The CPU's: N a multiple of 16.
CUDA_INNER_K_TILES = 8
KERNEL_DTYPE = torch.bfloat16


def kernel_group_size(group_size: int) -> int | None:
    """The largest of the kernels' group sizes that divides `group_size`, or None."""
    return next((size for size in reversed(GROUP_SIZES) if group_size % size == 0), None)


def int4_weight(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int) -> Int4Pack | NativeInt4:
    """The weight for the fastest kernel on q's device, from q [N, K] (integers 0..15), scales and
    float zeros [N, K / group_size] (W = (q - 8) * scale + zero); Int4Pack.fits must hold. On a
    CPU with AVX512-VNNI or AVX2, Pagoda's own C matmul (NativeInt4); elsewhere torch's (Int4Pack)."""
    if not q.is_cuda and cpu_native.int_matmuls_available():
        return NativeInt4.from_values(q, scales, zeros, group_size)
    return Int4Pack.from_values(q, scales, zeros, group_size)


def c_int4_weight(layer: nn.Module) -> NativeInt4 | None:
    """A 4-bit layer's weight where its output is the C matmul's plus its bias (LinearMethod.c_int4_weight)."""
    int4 = getattr(layer, "int4", None)
    return int4 if isinstance(int4, NativeInt4) else None


class _Int4Linear(nn.Module):
    """A 4-bit weight-only layer's weight: `matmul` from its kernel, `linear` over it."""

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """x @ W^T + b over x's last dimension."""
        out = self.matmul(x.reshape(-1, x.shape[-1]))
        out = out.reshape(*x.shape[:-1], out.shape[-1])
        return out if bias is None else out + bias


class Int4Pack(_Int4Linear):
    """W [N, K] in torch's int4 layout for the device it is on, with scales_and_zeros
    [groups, N, 2] (bfloat16). A module so that its tensors count among the layer's parameters."""

    def __init__(self, weight: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.scales_and_zeros = nn.Parameter(scales_and_zeros, requires_grad=False)
        self.group_size = group_size

    @staticmethod
    def fits(n: int, k: int, group_size: int, device: torch.device, dtype: torch.dtype) -> bool:
        """Whether a kernel on `device` runs an N x K weight in groups of `group_size` inputs for
        activations of `dtype`."""
        if k % group_size or kernel_group_size(group_size) is None:
            return False
        if device.type == "cuda":
            return dtype == KERNEL_DTYPE and k % (16 * CUDA_INNER_K_TILES) == 0 and n % 8 == 0
        return device.type == "cpu" and n % 16 == 0

    @classmethod
    def from_values(cls, q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int) -> Int4Pack:
        """From q [N, K] (integers 0..15), scales and float zeros [N, K / group_size] on the
        kernel's device (W = (q - 8) * scale + zero); `fits` must hold."""
        size = kernel_group_size(group_size)
        scales_and_zeros = torch.stack([scales, zeros], dim=-1).to(KERNEL_DTYPE)
        # [groups, N, 2], each group's pair repeated over its kernel-sized sub-groups.
        scales_and_zeros = scales_and_zeros.repeat_interleave(group_size // size, dim=1).transpose(0, 1).contiguous()
        if q.is_cuda:
            pairs = ((q[:, ::2] << 4) | q[:, 1::2]).to(torch.uint8)  # even k in the high nibble
            weight = torch._convert_weight_to_int4pack(pairs.contiguous(), CUDA_INNER_K_TILES)
        else:
            weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.int().contiguous(), 2)
        return cls(weight, scales_and_zeros, size)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x [M, K] @ W^T -> [M, N] in x's dtype (computed in bfloat16)."""
        rows = x.to(KERNEL_DTYPE).contiguous()
        mm = torch._weight_int4pack_mm if x.is_cuda else torch.ops.aten._weight_int4pack_mm_for_cpu
        return mm(rows, self.weight, self.group_size, self.scales_and_zeros).to(x.dtype)


class NativeInt4(_Int4Linear):
    """W [N, K] in the blocks of Pagoda's C int4 matmul (pagoda/kernels/cpu_native.py): W = d * q + m
    with float16 d and m per output and 32 inputs, activations in int16 (finer than torch's kernel's
    bfloat16)."""

    def __init__(self, blocks: torch.Tensor, n: int) -> None:
        super().__init__()
        self.blocks = nn.Parameter(blocks, requires_grad=False)
        self.n = n

    @classmethod
    def from_values(cls, q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int) -> NativeInt4:
        """As int4_weight, on the CPU."""
        per_32 = group_size // cpu_native.INT4_INPUTS
        d = scales.float().repeat_interleave(per_32, dim=1)
        m = (zeros.float() - 8 * scales.float()).repeat_interleave(per_32, dim=1)
        return cls(cpu_native.int4_pack(q, d, m), q.shape[0])

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x [M, K] @ W^T -> [M, N] in x's dtype (computed in float32 and int32)."""
        if x.dtype != torch.float32:
            return self.matmul(x.float()).to(x.dtype)
        # Eagerly the function itself: 120 calls a step of the default model, ~4 us each through
        # the op's dispatch; the compiled forward's graph holds the op (opaque to the compiler).
        mm = cpu_native.int4_matmul_op if torch.compiler.is_compiling() else cpu_native.int4_matmul
        return mm(x, self.blocks, self.n)
