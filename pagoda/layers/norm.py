"""RMSNorm, optionally fused with the residual add that precedes it in every decoder layer.
On CUDA one Triton kernel does both, on the CPU (float32) one C kernel; the torch code is the
reference and the path elsewhere.
GemmaRMSNorm scales by (1 + weight) (Gemma's checkpoints store the offset from one)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pagoda.kernels import cpu_native
from pagoda.layers.linear import Fp8Input, InputQuantization


class RMSNorm(nn.Module):
    # Whether norm(x) is rounded to x's dtype before the weight scales it, as each reference does.
    cast_before_scale = True

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size), requires_grad=False)
        self.eps = eps

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:
            # torch's fused op computes exactly the lines below for float32 (for 16-bit inputs
            # it rounds differently) in one op instead of eight: on the CPU, per-op overhead is
            # most of a small decode step.
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        # Normalise in fp32 as the reference implementations do, then cast back.
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)

    def _kernel_weight(self) -> torch.Tensor:
        return self.weight

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None, quant: InputQuantization | None = None
    ) -> torch.Tensor | Fp8Input | tuple[torch.Tensor | Fp8Input, torch.Tensor]:
        """Without `residual`: norm(x). With it: (norm(x + residual), x + residual); on CUDA (and by
        the CPU's C kernel) the sum is written into `residual`'s storage. quant: the next matmul's
        input quantization, which the CUDA kernel applies to norm(x) as it writes it (an Fp8Input;
        x [tokens, hidden])."""
        if x.is_cuda:
            from pagoda.kernels.elementwise import rms_norm

            out = rms_norm(x, self._kernel_weight(), self.eps, residual, self.cast_before_scale, quant)
            if quant is not None:
                out = Fp8Input(*out, x.dtype)
            return out if residual is None else (out, residual)
        if cpu_native.elementwise_serves(x, self.weight) and (residual is None or residual.is_contiguous()):
            out = cpu_native.rms_norm(x, self._kernel_weight(), self.eps, residual)
            return out if residual is None else (out, residual)
        if residual is None:
            return self._norm(x)
        x = x + residual
        return self._norm(x), x


class GemmaRMSNorm(RMSNorm):
    cast_before_scale = False

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__(hidden_size, eps)
        self.weight.data.zero_()

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        # Scaled in fp32 and then cast, as Gemma's reference rounds (Llama casts first).
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * (1.0 + self.weight.float())).to(x.dtype)

    def _kernel_weight(self) -> torch.Tensor:
        return 1.0 + self.weight.float()
