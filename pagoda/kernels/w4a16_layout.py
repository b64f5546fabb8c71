"""The W4A16 weights' packed layout, in plain torch (no Triton: the CPU path and the loaders import
it without the GPU kernel of pagoda/kernels/w4a16_gemm.py, whose import alone costs ~70 MB).

One packed layout serves every checkpoint format (AWQ, GPTQ, compressed-tensors repack into it at
load):
- `qweight` int32 [K / 8, N]: W^T packed along the input dim K; nibble j (bits 4j..4j+3) of word
  [i, n] is the unsigned 4-bit value of W[n, 8i + j].
- `scales` [groups, N] in the activation dtype; `zeros` [groups, N] in the same dtype holding the
  unsigned zero point (0..15), or None for symmetric weights (zero point 8).
- `g_idx` int32 [K] or None: the group of each input row (GPTQ act-order); None means row k is in
  group k // group_size (group_size = K for per-channel scales).
W[n, k] = (q[k, n] - zero[g(k), n]) * scale[g(k), n].
"""

from __future__ import annotations

import torch

PACK = 8  # 4-bit values per int32


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """[K, N] unsigned 4-bit values (any integer dtype) -> int32 [K / 8, N] (the kernel's layout)."""
    k, n = q.shape
    nibbles = q.to(torch.int32).reshape(k // PACK, PACK, n)
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=q.device)
    # The nibbles occupy disjoint bits, so their sum is their bitwise or (int32 wraps the top one).
    return (nibbles << shifts[None, :, None]).sum(dim=1, dtype=torch.int32)


def unpack_int4(packed: torch.Tensor, dim: int) -> torch.Tensor:
    """Int32 words holding 8 sequential 4-bit values each -> int32 values 0..15, the packed
    dimension `dim` (0 or 1) 8 times longer."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=packed.device)
    if dim == 0:
        values = (packed[:, None, :] >> shifts[None, :, None]) & 0xF
        return values.reshape(packed.shape[0] * PACK, packed.shape[1])
    values = (packed[:, :, None] >> shifts[None, None, :]) & 0xF
    return values.reshape(packed.shape[0], packed.shape[1] * PACK)


def dequantize(
    qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, g_idx: torch.Tensor | None,
    group_size: int,
) -> torch.Tensor:
    """W^T [K, N] in the scales' dtype, from the packed layout (the torch reference)."""
    q = unpack_int4(qweight, dim=0)
    groups = g_idx.long() if g_idx is not None else torch.arange(q.shape[0], device=q.device) // group_size
    zero = 8 if zeros is None else zeros[groups]
    return (q.to(scales.dtype) - zero) * scales[groups]


def w4a16_gemm_reference(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
    g_idx: torch.Tensor | None, group_size: int,
) -> torch.Tensor:
    """y = x @ dequantize(W) (the torch path: the CPU, and the kernel's tests)."""
    return x @ dequantize(qweight, scales, zeros, g_idx, group_size).to(x.dtype)
