"""GPTQ checkpoints (AutoGPTQ's layout), 4-bit weight-only through the W4A16 kernel.

AutoGPTQ stores, per linear layer: qweight int32 [in / 8, out], eight consecutive input rows per
word, low nibble first (already the kernel's layout); qzeros int32 [groups, out / 8], eight
consecutive columns per word, each zero stored minus one in checkpoint_format "gptq" (v1) and as
is in "gptq_v2"; scales [groups, out]; g_idx int32 [in], the group of each input row (shuffled
by act-order, `desc_act`). W = (q - zero) * scale[g_idx]."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pagoda.kernels.w4a16_layout import PACK, unpack_int4
from pagoda.layers.linear import LinearMethod, sliced_param
from pagoda.quantization.base import QuantizationConfig
from pagoda.quantization.w4a16 import (
    PackedW4,
    W4A16LinearMethod,
    check_bits,
    check_output,
    num_groups,
)

ZERO_OFFSETS = {"gptq": 1, "gptq_v2": 0}


class GPTQLinearMethod(W4A16LinearMethod):
    checkpoint_params = ("qweight", "qzeros", "scales", "g_idx")

    def __init__(self, group_size: int, desc_act: bool, sym: bool, zero_offset: int) -> None:
        self.group_size = group_size
        self.desc_act = desc_act
        self.sym = sym
        self.zero_offset = zero_offset

    def create_weights(self, layer: nn.Module, input_size: int, output_size: int) -> None:
        check_output(output_size, "GPTQ")
        if input_size % PACK:
            raise ValueError(f"GPTQ: a layer's {input_size} input features are not a multiple of {PACK}")
        groups = num_groups(input_size, self.group_size)
        along_input = {} if self.group_size == -1 else {"input_dim": 0, "input_divisor": self.group_size}
        shard = getattr(layer, "input_shard", None)
        if self.desc_act and shard is not None and shard.size != shard.full:
            # With act-order a rank's rows belong to any group: it keeps every group's scales and
            # zeros, and its slice of g_idx indexes them (as vLLM does).
            groups, along_input = num_groups(shard.full, self.group_size), {}
        layer.qweight = sliced_param(
            torch.empty(input_size // PACK, output_size, dtype=torch.int32), input_dim=0, input_divisor=PACK, output_dim=1
        )
        layer.qzeros = sliced_param(
            torch.empty(groups, output_size // PACK, dtype=torch.int32), output_dim=1, output_divisor=PACK, **along_input
        )
        layer.scales = sliced_param(torch.empty(groups, output_size), output_dim=1, **along_input)
        layer.g_idx = sliced_param(torch.empty(input_size, dtype=torch.int32), input_dim=0)

    def repack(self, layer: nn.Module) -> PackedW4:
        scales = layer.scales.data
        zeros = None
        if not self.sym:
            zeros = ((unpack_int4(layer.qzeros.data, dim=1) + self.zero_offset) & 0xF).to(scales.dtype)
        # Without act-order g_idx is row // group_size, which the kernel computes itself.
        g_idx = layer.g_idx.data.to(torch.int32) if self.desc_act else None
        group_size = layer.qweight.shape[0] * PACK if self.group_size == -1 else self.group_size
        return PackedW4(layer.qweight.data, scales, zeros, g_idx, group_size)


class GPTQConfig(QuantizationConfig):
    name = "gptq"

    def __init__(self, group_size: int, desc_act: bool, sym: bool, checkpoint_format: str) -> None:
        self.group_size = group_size
        self.desc_act = desc_act
        self.sym = sym
        self.zero_offset = ZERO_OFFSETS[checkpoint_format]

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> GPTQConfig:
        check_bits(config.get("bits"), "bits", "GPTQ")
        checkpoint_format = config.get("checkpoint_format", "gptq")
        if checkpoint_format not in ZERO_OFFSETS:
            raise ValueError(
                f"GPTQ checkpoint has checkpoint_format={checkpoint_format!r}: supported: {', '.join(ZERO_OFFSETS)}"
            )
        return cls(config["group_size"], bool(config.get("desc_act", False)), bool(config.get("sym", True)), checkpoint_format)

    def linear_method(self, prefix: str) -> LinearMethod:
        return GPTQLinearMethod(self.group_size, self.desc_act, self.sym, self.zero_offset)
