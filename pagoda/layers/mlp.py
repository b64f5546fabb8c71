"""The gated MLP of Llama-style decoders: down(act(gate(x)) * up(x)), gate and up packed into one
column-parallel matmul."""

from __future__ import annotations

import torch
from torch import nn

from pagoda.layers.activation import get_act_and_mul
from pagoda.layers.linear import ColumnParallelLinear, Fp8Input, InputQuantization, RowParallelLinear, even_shard
from pagoda.quantization.base import QuantizationConfig, linear_method_for


class GatedMLP(nn.Module):
    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        hidden_act: str,
        bias: bool = False,
        quant_config: QuantizationConfig | None = None,
        prefix: str = "",
    ) -> None:
        """prefix: our module path (model.layers.N.mlp), by which the quantization config picks each layer's method."""
        super().__init__()
        inter = even_shard(intermediate_size)
        self.gate_up_proj = ColumnParallelLinear(
            hidden_size, {"gate_proj": inter, "up_proj": inter}, bias=bias,
            linear_method=linear_method_for(quant_config, f"{prefix}.gate_up_proj"),
        )
        self.down_proj = RowParallelLinear(
            inter.full, hidden_size, bias=bias, linear_method=linear_method_for(quant_config, f"{prefix}.down_proj")
        )
        self.act = get_act_and_mul(hidden_act)

    @staticmethod
    def num_parameters(hidden_size: int, intermediate_size: int, bias: bool = False) -> int:
        """Unsharded, without building the layer."""
        return GatedMLP.num_linear_weights(hidden_size, intermediate_size) + bias * (2 * intermediate_size + hidden_size)

    @staticmethod
    def num_linear_weights(hidden_size: int, intermediate_size: int) -> int:
        """Of the linear layers' weights (what a quantization method holds), unsharded."""
        return 3 * hidden_size * intermediate_size

    def forward(self, x: torch.Tensor | Fp8Input) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_up_proj(x), self.down_proj.input_quantization()))

    def input_quantization(self) -> InputQuantization | None:
        """How the first matmul takes its input: the norm before it can quantize it as it writes it."""
        return self.gate_up_proj.input_quantization()
