"""A float32 embedding or LM head weight held as GGUF's Q8_0 holds it: int8 values and one scale per
32, a quarter of the bytes, each row given back exactly.

GGUF files keep the token embedding in Q8_0 more often than not (the default model's is 49,152 x
576: 113 MB dequantized, 31 MB so). Its float32 values are scale * q with an int8 q and a float16
scale, a product float32 holds exactly, so the values and scales are recovered from the float32
weight the loader gives (each block's scale is its largest magnitude / 127, as GGUF's quantizer sets
it) and checked to give back every value bit for bit; a weight that does not is left as it is.
Rows are dequantized when read: an embedding lookup reads a step's tokens, the LM head its screen's
candidates (pagoda/layers/lm_head_screen.py). They are held in blocks of 16 rows, interleaved for
the C matmul of that screen (pagoda/kernels/cpu_native.c) to read 16 outputs at a time."""

from __future__ import annotations

import torch
from torch import nn

GROUP = 32  # values per scale, as in Q8_0
ROWS_PER_BLOCK = 16  # rows interleaved in a block (the C matmul's outputs at a time)
_Q_MAX = 127
_CHUNK_ROWS = 4096  # rows checked at once: bounds the float32 temporaries of the conversion


class Q8Rows(nn.Module):
    """W [V, K] as int8 values and float32 scales, one per 32 values: W = values * scales. Held in
    blocks of 16 rows, each block's 32 values interleaved row by row in pairs as the C matmul of
    the LM head's screen reads them (pagoda/kernels/cpu_native.c): `blocks` [V/16, K/32, 16 pairs,
    16 rows, 2] and `block_scales` [V/16, K/32, 16 rows], V padded to a multiple of 16 with rows of
    zeros. A module so that its tensors count among the owning layer's parameters."""

    def __init__(self, values: torch.Tensor, scales: torch.Tensor) -> None:
        """From the rows: values int8 [V, K], scales float32 [V, K / 32]."""
        super().__init__()
        rows, width = values.shape
        pad = -rows % ROWS_PER_BLOCK
        if pad:
            values = torch.cat([values, values.new_zeros(pad, width)])
            scales = torch.cat([scales, scales.new_zeros(pad, width // GROUP)])
        blocks, groups = (rows + pad) // ROWS_PER_BLOCK, width // GROUP
        values = values.view(blocks, ROWS_PER_BLOCK, groups, GROUP // 2, 2).permute(0, 2, 3, 1, 4)
        self.blocks = nn.Parameter(values.contiguous(), requires_grad=False)
        self.block_scales = nn.Parameter(scales.view(blocks, ROWS_PER_BLOCK, groups).transpose(1, 2).contiguous(),
                                         requires_grad=False)
        self.num_rows = rows

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
        return torch.Size((self.num_rows, self.blocks.shape[1] * GROUP))

    def __getitem__(self, index: torch.Tensor) -> torch.Tensor:
        """The float32 rows at `index` (a 1-D tensor of row numbers), exactly the weight's."""
        block, row = index // ROWS_PER_BLOCK, index % ROWS_PER_BLOCK
        q = self.blocks[block, :, :, row].flatten(-2)  # [n, K / 32, 32]
        return (q.float() * self.block_scales[block, :, row].unsqueeze(-1)).flatten(-2)
