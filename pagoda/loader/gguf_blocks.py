"""GGUF's 4-bit blocks unpacked, without dequantizing, into integer weights and a scale and an
offset per 32 inputs: the form the GGUF linear method (pagoda/quantization/gguf.py) loads,
slices for packed and tensor-parallel layers, and repacks for the CPU's int4 kernel.

4-bit types give (qweight uint8 [N, K] holding 0..15, scales [N, K/32], zeros [N, K/32]) with
W = (q - 8) * scale + zero, the convention of PyTorch's CPU int4 kernel:
- Q4_0, blocks of 32: d, 16 bytes of nibbles; W = d * (q - 8): scale d, zero 0.
- Q4_1, blocks of 32: d, m, 16 bytes; W = d * q + m: scale d, zero m + 8d.
- Q4_K, super-blocks of 256: d, dmin, 12 bytes of 6-bit sub-scales sc and sub-mins mn (8 each),
  128 bytes; W = d * sc * q - dmin * mn per 32: scale d*sc, zero 8*d*sc - dmin*mn.
In every type a block's 32 values are its low nibbles then its high ones (Q4_K: per 64 values)."""

from __future__ import annotations

import gguf
import numpy as np
import torch

GROUP = 32  # inputs per scale, in every type here
INT4_TYPES = frozenset({"Q4_0", "Q4_1", "Q4_K"})


def unpack_blocks(data: np.ndarray, type_name: str) -> dict[str, torch.Tensor]:
    """A tensor's raw blocks (uint8 [N, bytes per row], as gguf's reader holds them) as its parts
    {"qweight", "scales", "zeros"}."""
    raw = torch.tensor(data)  # a copy: the reader's array is a read-only view of the memory-mapped file
    rows = raw.shape[0]
    _, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[type_name]]
    blocks = raw.reshape(-1, type_size)
    parts = _UNPACK[type_name](blocks)
    return {name: part.reshape(rows, -1) for name, part in parts.items()}


def _halves(blocks: torch.Tensor, start: int) -> torch.Tensor:
    return blocks[:, start : start + 2].contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor, run: int) -> torch.Tensor:
    """uint8 [B, bytes] -> values [B, 2 * bytes]: per `run` bytes, their low nibbles then their high."""
    qs = qs.reshape(qs.shape[0], -1, run)
    return torch.stack([qs & 0x0F, qs >> 4], dim=2).reshape(qs.shape[0], -1)


def _q4_0(blocks: torch.Tensor) -> dict[str, torch.Tensor]:
    d = _halves(blocks, 0)
    return {"qweight": _nibbles(blocks[:, 2:], 16), "scales": d, "zeros": torch.zeros_like(d)}


def _q4_1(blocks: torch.Tensor) -> dict[str, torch.Tensor]:
    d, m = _halves(blocks, 0), _halves(blocks, 2)
    return {"qweight": _nibbles(blocks[:, 4:], 16), "scales": d, "zeros": m + 8 * d}


def _q4_k(blocks: torch.Tensor) -> dict[str, torch.Tensor]:
    d, dmin = _halves(blocks, 0), _halves(blocks, 2)
    packed = blocks[:, 4:16].reshape(-1, 3, 4)
    low, high, mixed = packed[:, 0], packed[:, 1], packed[:, 2]
    sc = torch.cat([low & 0x3F, (mixed & 0x0F) | ((low >> 2) & 0x30)], dim=1).float()
    mn = torch.cat([high & 0x3F, (mixed >> 4) | ((high >> 2) & 0x30)], dim=1).float()
    scales = d * sc
    return {"qweight": _nibbles(blocks[:, 16:], 32), "scales": scales, "zeros": 8 * scales - dmin * mn}


_UNPACK = {"Q4_0": _q4_0, "Q4_1": _q4_1, "Q4_K": _q4_k}


def dequantize_parts(parts: dict[str, torch.Tensor]) -> torch.Tensor:
    """W [N, K] in float32 from unpacked parts (the reference the kernels are checked against)."""
    scales, zeros = (parts[name].repeat_interleave(GROUP, dim=1) for name in ("scales", "zeros"))
    return (parts["qweight"].float() - 8) * scales + zeros
