"""The fp8 KV cache's number format (--kv-cache-dtype fp8): a layer's keys are stored as
round(k / k_scale) and its values as round(v / v_scale), saturated to the fp8 range, and read as
fp8 * scale; one K and one V scale per layer (per tensor), 1.0 unless the checkpoint has them.

Its layout: the cache tensor's shape is a 16-bit one's, [2, blocks, block_size, Hkv, D], and its
keys are stored so, but each block of values holds them [Hkv, D, block_size], the slot innermost:
attention sums p @ v along the keys, and a GPU reads an 8-bit tile along its rows only a byte at a
time (Hopper has no transposing shared-memory load for 8-bit types; a decode's fp8 attention ran at
half the bandwidth)."""

from __future__ import annotations

import torch

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


def is_fp8(dtype: torch.dtype) -> bool:
    return dtype in FP8_DTYPES


def fp8_values(kv_cache: torch.Tensor) -> torch.Tensor:
    """An fp8 cache's values as stored, in bytes: [blocks, Hkv, D, block_size]."""
    _, num_blocks, block_size, num_kv_heads, head_dim = kv_cache.shape
    return kv_cache[1].view(torch.uint8).view(num_blocks, num_kv_heads, head_dim, block_size)


def quantize(x: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """x / scale in fp8 `dtype`, saturated: a cast alone would turn values past the range into
    NaN (e4m3fn) or inf (e5m2). scale None: 1.0."""
    x = x.float() if scale is None else x.float() / scale
    finfo = torch.finfo(dtype)
    return x.clamp(finfo.min, finfo.max).to(dtype)


def dequantize(x: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """fp8 x * scale in `dtype` (computed in float32). scale None: 1.0."""
    x = x.float() if scale is None else x.float() * scale
    return x.to(dtype)
