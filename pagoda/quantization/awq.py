"""AWQ checkpoints (AutoAWQ's GEMM layout), 4-bit weight-only through the W4A16 kernel.

AutoAWQ stores, per linear layer: qweight int32 [in, out / 8], eight output columns per word in
the interleaved order [0, 2, 4, 6, 1, 3, 5, 7] (nibble i holds column AWQ_ORDER[i]); qzeros int32
[in / group, out / 8], packed the same way; scales [in / group, out]. W = (q - zero) * scale."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pagoda.kernels.w4a16_layout import PACK, pack_int4, unpack_int4
from pagoda.layers.linear import LinearMethod, UnquantizedLinearMethod, sliced_param
from pagoda.quantization.base import QuantizationConfig
from pagoda.quantization.w4a16 import (
    PackedW4,
    W4A16LinearMethod,
    check_bits,
    check_output,
    num_groups,
)

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
# Column j of each 8 sits in nibble AWQ_UNDO[j].
AWQ_UNDO = tuple(AWQ_ORDER.index(j) for j in range(PACK))


def unpack_awq(packed: torch.Tensor) -> torch.Tensor:
    """AWQ-packed int32 [rows, cols / 8] -> int32 values [rows, cols] in column order."""
    values = unpack_int4(packed, dim=1).view(packed.shape[0], packed.shape[1], PACK)
    undo = torch.tensor(AWQ_UNDO, device=packed.device)
    return values[:, :, undo].reshape(packed.shape[0], -1)


def pack_awq(values: torch.Tensor) -> torch.Tensor:
    """Int values 0..15 [rows, cols] -> AWQ-packed int32 [rows, cols / 8] (unpack_awq's inverse)."""
    rows, cols = values.shape
    ordered = values.to(torch.int32).view(rows, cols // PACK, PACK)[:, :, list(AWQ_ORDER)]
    return pack_int4(ordered.reshape(rows, cols).t().contiguous()).t().contiguous()


def quantize_rtn_awq(weight: torch.Tensor, group_size: int) -> dict[str, torch.Tensor]:
    """A float weight [out, in] rounded to the nearest of 16 levels per group of `group_size`
    inputs (asymmetric: each group's own scale and zero point), in AutoAWQ's GEMM layout:
    qweight [in, out / 8], qzeros [in / group, out / 8], scales [in / group, out] (fp16)."""
    out_features, in_features = weight.shape
    if in_features % group_size:
        raise ValueError(f"group_size={group_size} does not divide the weight's {in_features} input features")
    groups = weight.float().t().reshape(in_features // group_size, group_size, out_features)
    low, high = groups.amin(dim=1), groups.amax(dim=1)
    scales = ((high - low) / 15).clamp(min=1e-8)
    zeros = (-low / scales).round().clamp(0, 15)
    q = (groups / scales[:, None] + zeros[:, None]).round().clamp(0, 15).reshape(in_features, out_features)
    return {"qweight": pack_awq(q), "qzeros": pack_awq(zeros), "scales": scales.half()}


class AWQLinearMethod(W4A16LinearMethod):
    checkpoint_params = ("qweight", "qzeros", "scales")

    def __init__(self, group_size: int) -> None:
        self.group_size = group_size

    def create_weights(self, layer: nn.Module, input_size: int, output_size: int) -> None:
        check_output(output_size, "AWQ")
        groups = num_groups(input_size, self.group_size)
        along_input = {} if self.group_size == -1 else {"input_dim": 0, "input_divisor": self.group_size}
        packed_out = {"output_dim": 1, "output_divisor": PACK}
        layer.qweight = sliced_param(
            torch.empty(input_size, output_size // PACK, dtype=torch.int32), input_dim=0, **packed_out
        )
        layer.qzeros = sliced_param(torch.empty(groups, output_size // PACK, dtype=torch.int32), **packed_out, **along_input)
        layer.scales = sliced_param(torch.empty(groups, output_size), output_dim=1, **along_input)

    def repack(self, layer: nn.Module) -> PackedW4:
        qweight = pack_int4(unpack_awq(layer.qweight.data))
        scales = layer.scales.data
        zeros = unpack_awq(layer.qzeros.data).to(scales.dtype)
        group_size = layer.qweight.shape[0] if self.group_size == -1 else self.group_size
        return PackedW4(qweight, scales, zeros, None, group_size)


class AWQConfig(QuantizationConfig):
    name = "awq"

    def __init__(self, group_size: int, modules_to_not_convert: list[str]) -> None:
        self.group_size = group_size
        self.modules_to_not_convert = modules_to_not_convert

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> AWQConfig:
        check_bits(_first(config, "w_bit", "bits"), "bits", "AWQ")
        if not config.get("zero_point", True):
            raise ValueError("AWQ checkpoint has zero_point=false: only zero_point=true is supported")
        version = str(config.get("version", "gemm")).lower()
        if version != "gemm":
            raise ValueError(f"AWQ checkpoint has version={version!r}: only the GEMM layout (version 'gemm') is supported")
        return cls(_first(config, "q_group_size", "group_size"), list(config.get("modules_to_not_convert") or []))

    def quantize_dummy_weight(self, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        return quantize_rtn_awq(weight, weight.shape[1] if self.group_size == -1 else self.group_size)

    def linear_method(self, prefix: str) -> LinearMethod:
        if any(module in prefix for module in self.modules_to_not_convert):
            return UnquantizedLinearMethod()
        return AWQLinearMethod(self.group_size)


def _first(config: dict[str, Any], *keys: str) -> Any:
    """The value of the first of `keys` present (checkpoints spell AWQ's fields two ways)."""
    for key in keys:
        if key in config:
            return config[key]
    raise ValueError(f"AWQ quantization_config has none of {', '.join(keys)}")
