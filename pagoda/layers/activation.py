"""Activations: of the gated MLP, SiLU (Llama family) and tanh-approximated GELU (Gemma's GeGLU);
of a plain MLP (BERT-style encoders), GELU exact or tanh-approximated, and ReLU."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pagoda.kernels import cpu_native
from pagoda.layers.linear import Fp8Input, InputQuantization


class SiluAndMul(nn.Module):
    """silu(gate) * up, over the merged [gate | up] projection output."""

    def forward(self, x: torch.Tensor, quant: InputQuantization | None = None) -> torch.Tensor | Fp8Input:
        """quant: the next matmul's input quantization, which the CUDA kernel applies as it writes
        (an Fp8Input; x [tokens, 2N])."""
        if x.is_cuda:
            from pagoda.kernels.elementwise import silu_and_mul

            return silu_and_mul(x) if quant is None else Fp8Input(*silu_and_mul(x, quant), x.dtype)
        if cpu_native.elementwise_serves(x):
            return cpu_native.silu_and_mul(x)
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up


class GeluTanhAndMul(nn.Module):
    """gelu_tanh(gate) * up, over the merged [gate | up] projection output."""

    def forward(self, x: torch.Tensor, quant: InputQuantization | None = None) -> torch.Tensor:
        """quant: ignored (no fused kernel here): the next matmul quantizes its input itself."""
        gate, up = x.chunk(2, dim=-1)
        return F.gelu(gate, approximate="tanh") * up


_ACT_AND_MUL = {"silu": SiluAndMul, "gelu_pytorch_tanh": GeluTanhAndMul}


def get_act_and_mul(hidden_act: str) -> nn.Module:
    if hidden_act not in _ACT_AND_MUL:
        raise ValueError(f"hidden_act={hidden_act!r} is not supported; supported: {sorted(_ACT_AND_MUL)}")
    return _ACT_AND_MUL[hidden_act]()


# transformers' hidden_act names of the plain activations (its ACT2FN's meaning for each).
_ACT = {
    "gelu": nn.GELU,
    "gelu_new": lambda: nn.GELU(approximate="tanh"),
    "gelu_pytorch_tanh": lambda: nn.GELU(approximate="tanh"),
    "relu": nn.ReLU,
}


def get_act(hidden_act: str) -> nn.Module:
    if hidden_act not in _ACT:
        raise ValueError(f"hidden_act={hidden_act!r} is not supported; supported: {sorted(_ACT)}")
    return _ACT[hidden_act]()
