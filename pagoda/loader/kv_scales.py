"""An fp8 KV cache's per-layer K and V scales from a checkpoint, under the names vLLM reads:
`self_attn.k_scale` / `v_scale` (Hugging Face fp8 and llm-compressor checkpoints), the older
compressed-tensors `self_attn.k_proj.output_scale` / `v_proj.output_scale`, and the older still
`kv_scale`, one scale for both. Each is one number (per tensor), the same on every TP rank."""

from __future__ import annotations

import torch
from torch import nn

from pagoda.layers.attention import Attention
from pagoda.models.interface import PPMissingLayer

# Checkpoint name suffix -> the Attention buffers it sets.
_SCALE_SUFFIXES = {
    ".k_scale": ("k_scale",),
    ".v_scale": ("v_scale",),
    ".k_proj.output_scale": ("k_scale",),
    ".v_proj.output_scale": ("v_scale",),
    ".kv_scale": ("k_scale", "v_scale"),
}


def load_kv_scale(model: nn.Module, name: str, tensor: torch.Tensor) -> bool:
    """Whether `name` is a KV cache scale; if so, it is set on the attention layer under its
    module (skipped where another pipeline stage holds that layer)."""
    for suffix, buffers in _SCALE_SUFFIXES.items():
        if name.endswith(suffix):
            attention = _attention_under(model, name[: -len(suffix)])
            if attention is not None:
                if tensor.numel() != 1:
                    raise ValueError(f"checkpoint tensor {name!r} has {tensor.numel()} values: a per-tensor KV "
                                     "cache scale is one")
                for buffer in buffers:
                    getattr(attention, buffer).copy_(tensor.reshape(()))
            return True
    return False


def _attention_under(model: nn.Module, path: str) -> Attention | None:
    module: nn.Module | None = model
    for attr in path.split("."):
        module = getattr(module, attr, None)
        if module is None or isinstance(module, PPMissingLayer):
            return None
    return next((m for m in module.modules() if isinstance(m, Attention)), None)
