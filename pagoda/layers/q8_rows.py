"""A float32 embedding or LM head weight held as GGUF's Q8_0 holds it: int8 values and one scale per
32, a quarter of the bytes, each row given back exactly.

GGUF files keep the token embedding in Q8_0 more often than not (the default model's is 49,152 x
576: 113 MB dequantized, 31 MB so). Its float32 values are scale * q with an int8 q and a float16
scale, a product float32 holds exactly, so the values and scales are recovered from the float32
weight the loader gives (each block's scale is its largest magnitude / 127, as GGUF's quantizer sets
it) and checked to give back every value bit for bit; a weight that does not is left as it is.
Rows are dequantized when read: an embedding lookup reads a step's tokens, the LM head its screen's
candidates (pagoda/layers/lm_head_screen.py)."""

from __future__ import annotations

import torch
from torch import nn

GROUP = 32  # values per scale, as in Q8_0
_Q_MAX = 127
_CHUNK_ROWS = 4096  # rows checked at once: bounds the float32 temporaries of the conversion


class Q8Rows(nn.Module):
    """W [V, K] as values int8 [V, K] and scales float32 [V, K / 32]: W = values * scales per 32.
    A module so that its tensors count among the owning layer's parameters."""

    def __init__(self, values: torch.Tensor, scales: torch.Tensor) -> None:
        super().__init__()
        self.values = nn.Parameter(values, requires_grad=False)
        self.scales = nn.Parameter(scales, requires_grad=False)

    @classmethod
    def lossless(cls, weight: torch.Tensor) -> Q8Rows | None:
        """The weight in Q8_0 form if that gives back each of its values exactly, else None."""
        rows, width = weight.shape
        if weight.dtype != torch.float32 or width % GROUP:
            return None
        values = torch.empty(rows, width, dtype=torch.int8, device=weight.device)
        scales = torch.empty(rows, width // GROUP, dtype=torch.float32, device=weight.device)
        for start in range(0, rows, _CHUNK_ROWS):
            chunk = weight[start : start + _CHUNK_ROWS].unflatten(-1, (-1, GROUP))
            scale = chunk.abs().amax(dim=-1) / _Q_MAX
            q = torch.round(chunk / scale.clamp_min(torch.finfo(torch.float32).tiny).unsqueeze(-1))
            if not torch.equal(q * scale.unsqueeze(-1), chunk):  # not Q8_0's values (or a NaN)
                return None
            values[start : start + _CHUNK_ROWS] = q.flatten(-2).to(torch.int8)
            scales[start : start + _CHUNK_ROWS] = scale
        return cls(values, scales)

    @property
    def shape(self) -> torch.Size:
        return self.values.shape

    def __getitem__(self, index: torch.Tensor) -> torch.Tensor:
        """The float32 rows at `index` (a 1-D tensor of row numbers), exactly the weight's."""
        q = self.values[index].unflatten(-1, (-1, GROUP))
        return (q.float() * self.scales[index].unsqueeze(-1)).flatten(-2)
