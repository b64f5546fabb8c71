"""INT8 W8A8 (compressed-tensors' SmoothQuant-style scheme): symmetric int8 weights with one
float32 scale per output channel (or per tensor), activations quantized per token at run time.

On the GPU the GEMM is `torch._int_mm` (int8 x int8 -> int32, cuBLASLt), rescaled by the token
and channel scales; it needs more than 16 rows (fewer are padded) and K and N multiples of 8
(else the weight is dequantized). On the CPU the weight-only int8 kernel
(`aten._weight_int8pack_mm`) multiplies the activations as they are."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pagoda.layers.linear import LinearMethod, linear, sliced_param
from pagoda.quantization.fp8 import dequantize_rows, per_channel_scales

INT8_MAX = 127
# torch._int_mm on CUDA: M > 16, K and N multiples of 8.
_INT_MM_MIN_ROWS = 17
_INT_MM_ALIGN = 8


def quantize_int8_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 rows, float32 scale per row): symmetric, each row's largest magnitude mapped to 127."""
    scale = x.abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-12) / INT8_MAX
    return (x.float() / scale).round().clamp(-INT8_MAX - 1, INT8_MAX).to(torch.int8), scale


def int8_mm(qx: torch.Tensor, x_scale: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
            dtype: torch.dtype) -> torch.Tensor:
    """(qx * x_scale) @ (weight * weight_scale)^T in `dtype` through torch._int_mm: qx [M, K] int8
    with x_scale [M, 1], weight [N, K] int8 with weight_scale [N]; M is padded to the 17 rows the
    kernel needs."""
    rows = qx.shape[0]
    if rows < _INT_MM_MIN_ROWS:
        qx = F.pad(qx, (0, 0, 0, _INT_MM_MIN_ROWS - rows))
    acc = torch._int_mm(qx, weight.t())[:rows]
    return (acc.float() * x_scale * weight_scale).to(dtype)


class Int8LinearMethod(LinearMethod):
    """Checkpoint `weight` int8 [out, in] and `weight_scale` float32 [out, 1] (channel_scales) or
    one per part of a packed layer (per tensor)."""

    def __init__(self, channel_scales: bool = True) -> None:
        self.channel_scales = channel_scales

    def create_weights(self, layer: nn.Module, input_size: int, output_size: int) -> None:
        layer.weight = sliced_param(torch.empty(output_size, input_size, dtype=torch.int8), output_dim=0, input_dim=1)
        if self.channel_scales:
            layer.weight_scale = sliced_param(torch.empty(output_size, 1, dtype=torch.float32), output_dim=0)
        else:
            layer.weight_scale = sliced_param(torch.empty(len(layer.part_sizes), dtype=torch.float32), per_part=True)

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        scale = per_channel_scales(layer.weight_scale.data, layer.part_sizes)
        layer.weight_scale = nn.Parameter(scale.contiguous(), requires_grad=False)
        out_features, in_features = layer.weight.shape
        layer.int8_gemm = (
            layer.weight.is_cuda and in_features % _INT_MM_ALIGN == 0 and out_features % _INT_MM_ALIGN == 0
        )

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if layer.int8_gemm:
            qx, x_scale = quantize_int8_rows(x2)
            out = int8_mm(qx, x_scale, layer.weight, layer.weight_scale, x.dtype)
        elif x.device.type == "cpu":
            out = torch.ops.aten._weight_int8pack_mm(x2, layer.weight, layer.weight_scale.to(x.dtype))
        else:
            out = linear(x2, dequantize_rows(layer.weight, layer.weight_scale, x.dtype))
        if bias is not None:
            out = out + bias
        return out.reshape(*shape[:-1], out.shape[-1])
