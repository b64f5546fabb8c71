"""The fp8 KV cache's number format (--kv-cache-dtype fp8): a layer's keys are stored as
round(k / k_scale) and its values as round(v / v_scale), saturated to the fp8 range, and read as
fp8 * scale; one K and one V scale per layer (per tensor), 1.0 unless the checkpoint has them."""

from __future__ import annotations

import torch

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


def is_fp8(dtype: torch.dtype) -> bool:
    return dtype in FP8_DTYPES


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
