"""Activations of the gated MLP."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SiluAndMul(nn.Module):
    """silu(gate) * up, over the merged [gate | up] projection output."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda:
            from pagoda.kernels.elementwise import silu_and_mul

            return silu_and_mul(x)
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up


def get_act_and_mul(hidden_act: str) -> nn.Module:
    if hidden_act != "silu":
        raise ValueError(f"hidden_act={hidden_act!r} is not supported; supported: 'silu'")
    return SiluAndMul()
