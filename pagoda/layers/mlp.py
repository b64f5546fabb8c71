"""The gated MLP of Llama-style decoders: down(act(gate(x)) * up(x)), gate and up packed into one
column-parallel matmul."""

from __future__ import annotations

import torch
from torch import nn

from pagoda.layers.activation import get_act_and_mul
from pagoda.layers.linear import (
    ColumnParallelLinear,
    LinearMethod,
    RowParallelLinear,
    even_shard,
)


class GatedMLP(nn.Module):
    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        hidden_act: str,
        bias: bool = False,
        linear_method: LinearMethod | None = None,
    ) -> None:
        super().__init__()
        inter = even_shard(intermediate_size)
        self.gate_up_proj = ColumnParallelLinear(
            hidden_size, {"gate_proj": inter, "up_proj": inter}, bias=bias, linear_method=linear_method
        )
        self.down_proj = RowParallelLinear(inter.full, hidden_size, bias=bias, linear_method=linear_method)
        self.act = get_act_and_mul(hidden_act)

    @staticmethod
    def num_parameters(hidden_size: int, intermediate_size: int, bias: bool = False) -> int:
        """Unsharded, without building the layer."""
        return 3 * hidden_size * intermediate_size + bias * (2 * intermediate_size + hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_up_proj(x)))
