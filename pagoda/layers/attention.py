"""The attention front a model layer calls: shapes, scale, the layer's sliding window and score
soft-cap, its KV cache's dtype and (for an fp8 cache) the per-tensor K and V scales, and the
backend that does the work."""

from __future__ import annotations

import torch
from torch import nn

from pagoda.attention.backend import AttentionBackend, AttentionMetadata
from pagoda.attention.kv_cache_spec import FullAttentionSpec
from pagoda.attention.opaque import paged_attention


class Attention(nn.Module):
    def __init__(
        self,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        backend: AttentionBackend,
        scale: float | None = None,
        sliding_window: int | None = None,
        logits_soft_cap: float | None = None,
    ) -> None:
        """scale: of q.k (head_dim ** -0.5 unless given); sliding_window: a query sees only the
        last `sliding_window` tokens, itself included; logits_soft_cap: scores become
        cap * tanh(score / cap)."""
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale if scale is not None else head_dim**-0.5
        self.sliding_window = sliding_window
        self.logits_soft_cap = logits_soft_cap
        self.backend = backend
        # The cache holds keys and values in the model's dtype (the default dtype while it is built)
        # unless the runner sets an fp8 one (--kv-cache-dtype).
        self.kv_cache_dtype = torch.get_default_dtype()
        # An fp8 cache stores k / k_scale and v / v_scale: 1.0 unless the checkpoint has them
        # (pagoda/loader/kv_scales.py). Device tensors, so CUDA graphs read the loaded values.
        self.register_buffer("k_scale", torch.ones((), dtype=torch.float32), persistent=False)
        self.register_buffer("v_scale", torch.ones((), dtype=torch.float32), persistent=False)

    def kv_cache_spec(self, block_size: int) -> FullAttentionSpec:
        return FullAttentionSpec(block_size, self.num_kv_heads, self.head_dim, self.kv_cache_dtype, self.sliding_window)

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_cache: torch.Tensor,
        metadata: AttentionMetadata,
    ) -> torch.Tensor:
        """q: [T, Hq, D]; k, v: [T, Hkv, D] -> [T, Hq * D]."""
        if torch.compiler.is_compiling():  # one graph for the model: attention an opaque op
            out = paged_attention(
                q, k, v, kv_cache, self.k_scale, self.v_scale, self.scale, self.sliding_window, self.logits_soft_cap
            )
        else:
            out = self.backend.forward(
                q, k, v, kv_cache, metadata, self.scale,
                sliding_window=self.sliding_window, logits_soft_cap=self.logits_soft_cap,
                kv_scales=(self.k_scale, self.v_scale),
            )
        return out.reshape(q.shape[0], self.num_heads * self.head_dim)
