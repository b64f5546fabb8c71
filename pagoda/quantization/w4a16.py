"""4-bit weight-only linear layers (W4A16), shared by every 4-bit format: each format's method
registers its checkpoint tensors and repacks them, after loading, into the one packed layout the
Triton kernel reads (pagoda/kernels/w4a16_layout.py). Where torch's own int4 kernels run the layer
(no act-order, groups they serve: pagoda/quantization/int4pack.py, shared with GGUF), it is also
packed for them: on CUDA a few rows (decode) go through tinygemm, many rows (prefill) through
cuBLAS on the weight dequantized in one pass, and the rest (and act-order GPTQ) through the Triton
kernel; one bfloat16 row of a large layer (the 8B shape's qkv, gate_up and down) goes through the
Triton GEMV, which reads the packed layout as it is; on the CPU every row count goes through its
int4 kernel (in bfloat16, also for float32 models: int4pack.py says why), which holds the layer
alone, and layers it cannot run through the torch reference (dequantize, then matmul, exact in the
model's dtype).

Also here: the compressed-tensors `pack-quantized` W4A16 scheme, as a method the
compressed-tensors config dispatches to (`compressed_tensors_w4a16_method`)."""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from pagoda.kernels.w4a16_layout import PACK, unpack_int4, w4a16_gemm_reference
from pagoda.layers.linear import LinearMethod, sliced_param
from pagoda.quantization.int4pack import Int4Pack, NativeInt4, c_int4_weight, int4_weight


@dataclass
class PackedW4:
    """W in the kernel's layout (see pagoda/kernels/w4a16_layout.py)."""

    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    g_idx: torch.Tensor | None
    group_size: int


# Row counts where each CUDA path wins at the 8B model's shapes on the H200
# (scripts/bench_linear_methods.py, us per layer's four matmuls): tinygemm up to 4 rows (64 at
# one row against the Triton GEMM's 140 and bf16's 116; 259 at 16 rows against 143), cuBLAS on the
# dequantized weight from 128 rows (331 against 528).
TINYGEMM_MAX_ROWS = 4
DEQUANTIZE_MIN_ROWS = 128


def to_int4pack(w: PackedW4) -> Int4Pack | NativeInt4 | None:
    """The layer packed for the int4 kernel on its device (int4pack.int4_weight), or None where that
    cannot run it (act-order, or groups and widths it refuses). An integer zero point z becomes the float zero
    (8 - z) * scale."""
    k, n = w.qweight.shape[0] * PACK, w.qweight.shape[1]
    if w.g_idx is not None or not Int4Pack.fits(n, k, w.group_size, w.qweight.device, w.scales.dtype):
        return None
    scales = w.scales.float()
    zeros = torch.zeros_like(scales) if w.zeros is None else (8.0 - w.zeros.float()) * scales
    return int4_weight(unpack_int4(w.qweight, dim=0).t(), scales.t(), zeros.t(), w.group_size)


def w4a16_linear(
    x: torch.Tensor, w: PackedW4 | None, bias: torch.Tensor | None = None, int4: Int4Pack | NativeInt4 | None = None
) -> torch.Tensor:
    """x @ W^T + b over x's last dim: on CUDA one row of a large layer through the GEMV; through `int4`
    where it holds the layer (on the CPU every row count, on CUDA up to TINYGEMM_MAX_ROWS), else from
    `w` (None only where `int4` serves all)."""
    rows = x.reshape(-1, x.shape[-1])
    if x.is_cuda and w is not None and _gemv_runs(rows, w):
        from pagoda.kernels.w4a16_gemv import w4a16_gemv

        out = w4a16_gemv(rows, w.qweight, w.scales, w.zeros, w.group_size)
    elif int4 is not None and (not x.is_cuda or rows.shape[0] <= TINYGEMM_MAX_ROWS):
        out = int4.matmul(rows)
    elif not x.is_cuda:
        out = w4a16_gemm_reference(rows, w.qweight, w.scales, w.zeros, w.g_idx, w.group_size)
    else:  # Triton, imported where it runs
        from pagoda.kernels.w4a16_gemm import w4_dequantize, w4a16_gemm

        if w.g_idx is None and rows.shape[0] >= DEQUANTIZE_MIN_ROWS:
            out = rows @ w4_dequantize(w.qweight, w.scales, w.zeros, w.group_size)
        else:
            out = w4a16_gemm(rows, w.qweight, w.scales, w.zeros, w.g_idx, w.group_size)
    out = out.reshape(*x.shape[:-1], out.shape[-1])
    return out if bias is None else out + bias


def _gemv_runs(rows: torch.Tensor, w: PackedW4) -> bool:
    """Whether the GEMV takes this matmul: one bfloat16 row, no act-order, groups of whole words (what
    the kernel accepts), a layer large enough."""
    from pagoda.kernels.w4a16_gemv import pays, takes

    return w.g_idx is None and takes(rows, w.group_size) and pays(w.qweight.shape[1], rows.shape[1])


def check_bits(bits: int, field: str, method: str) -> None:
    if bits != 4:
        raise ValueError(f"{method} checkpoint has {field}={bits}: only {field}=4 is supported")


def num_groups(input_size: int, group_size: int, field: str = "group_size") -> int:
    """Groups along this layer's `input_size` inputs (group_size -1: one, per output channel)."""
    if group_size == -1:
        return 1
    if group_size <= 0 or input_size % group_size:
        raise ValueError(
            f"quantization_config {field}={group_size} does not divide the layer's {input_size} input features "
            "(supported: -1 for per-channel, or a size dividing every layer's input)"
        )
    return input_size // group_size


def check_output(output_size: int, method: str) -> None:
    if output_size % PACK:
        raise ValueError(f"{method}: a layer's {output_size} output features are not a multiple of {PACK}")


class W4A16LinearMethod(LinearMethod):
    """The shared part: after loading, the format's `repack` gives the kernel's layout, which
    replaces the checkpoint tensors on the layer."""

    checkpoint_params: tuple[str, ...] = ()

    @abstractmethod
    def repack(self, layer: nn.Module) -> PackedW4:
        """The loaded checkpoint tensors of `layer` in the kernel's layout."""

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        packed = self.repack(layer)
        for name in self.checkpoint_params:
            delattr(layer, name)
        layer.int4 = to_int4pack(packed)
        # The CPU's int4 kernel serves every row count: the layer then holds it alone.
        kept = None if layer.int4 is not None and not packed.qweight.is_cuda else packed
        for name in ("qweight", "scales", "zeros", "g_idx"):
            tensor = None if kept is None else getattr(kept, name)
            layer.register_parameter(f"w4_{name}", None if tensor is None else sliced_param(tensor.contiguous()))
        layer.w4_group_size = packed.group_size

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        w = None
        if layer.w4_qweight is not None:
            w = PackedW4(layer.w4_qweight, layer.w4_scales, layer.w4_zeros, layer.w4_g_idx, layer.w4_group_size)
        return w4a16_linear(x, w, bias, layer.int4)

    def c_int4_weight(self, layer: nn.Module) -> NativeInt4 | None:
        return c_int4_weight(layer)


class CompressedTensorsW4A16(W4A16LinearMethod):
    """compressed-tensors `pack-quantized` int4 weights: weight_packed int32 [out, in/8] (8 signed
    values per word, stored +8), weight_scale [out, groups], weight_zero_point int32 [out/8, groups]
    (asymmetric only, packed along out), weight_shape [2]."""

    def __init__(self, group_size: int, symmetric: bool) -> None:
        self.group_size = group_size
        self.symmetric = symmetric
        self.checkpoint_params = ("weight_packed", "weight_scale", "weight_shape") + (
            () if symmetric else ("weight_zero_point",)
        )

    def create_weights(self, layer: nn.Module, input_size: int, output_size: int) -> None:
        groups = num_groups(input_size, self.group_size, "weights.group_size")
        along_input = {} if self.group_size == -1 else {"input_dim": 1, "input_divisor": self.group_size}
        layer.weight_packed = sliced_param(
            torch.empty(output_size, input_size // PACK, dtype=torch.int32), output_dim=0, input_dim=1, input_divisor=PACK
        )
        layer.weight_scale = sliced_param(torch.empty(output_size, groups), output_dim=0, **along_input)
        layer.weight_shape = sliced_param(torch.empty(2, dtype=torch.int64))
        if not self.symmetric:
            check_output(output_size, "compressed-tensors W4A16 asymmetric")
            layer.weight_zero_point = sliced_param(
                torch.empty(output_size // PACK, groups, dtype=torch.int32), output_dim=0, output_divisor=PACK, **along_input
            )

    def repack(self, layer: nn.Module) -> PackedW4:
        # Both layouts pack 8 consecutive input rows per word, low nibble first: a transpose repacks.
        qweight = layer.weight_packed.data.t()
        scales = layer.weight_scale.data.t()
        zeros = None
        if not self.symmetric:
            zeros = unpack_int4(layer.weight_zero_point.data, dim=0).t().to(scales.dtype)
        group_size = qweight.shape[0] * PACK if self.group_size == -1 else self.group_size
        return PackedW4(qweight, scales, zeros, None, group_size)


def compressed_tensors_w4a16_method(scheme: dict[str, Any]) -> CompressedTensorsW4A16:
    """The method for a compressed-tensors config group (its dict: "weights" holds num_bits,
    type, symmetric, strategy, group_size, actorder) whose weights are 4-bit ints and whose
    activations are not quantized."""
    weights = scheme["weights"]
    check_bits(weights.get("num_bits"), "weights.num_bits", "compressed-tensors W4A16")
    if weights.get("type", "int") != "int":
        raise ValueError(f"compressed-tensors W4A16: weights.type={weights.get('type')!r} is not supported (int only)")
    if weights.get("actorder") not in (None, False):
        raise ValueError(f"compressed-tensors W4A16: weights.actorder={weights['actorder']!r} is not supported")
    strategy = weights.get("strategy")
    if strategy == "channel":
        group_size = -1
    elif strategy == "group":
        group_size = weights.get("group_size")
    else:
        raise ValueError(f"compressed-tensors W4A16: weights.strategy={strategy!r} is not supported (group, channel)")
    return CompressedTensorsW4A16(group_size, bool(weights.get("symmetric", True)))
