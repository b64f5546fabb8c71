"""What one attention layer keeps in the paged KV cache (after vLLM's KVCacheSpec): the runner
allocates each layer's pool, and counts the bytes of a block, from these specs alone, so layers
of different shapes, windows or cache dtypes (fp8) can share one model."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class FullAttentionSpec:
    """Keys and values of every token of a sequence, `block_size` tokens a block."""

    block_size: int
    num_kv_heads: int
    head_size: int
    dtype: torch.dtype
    # Tokens a query attends to, for a sliding-window layer; None: all of them.
    sliding_window: int | None = None

    @property
    def block_shape(self) -> tuple[int, int, int, int]:
        """One block's keys and values: [2, block_size, KV heads, head size]."""
        return 2, self.block_size, self.num_kv_heads, self.head_size

    @property
    def page_size_bytes(self) -> int:
        """Bytes of one block of this layer."""
        return 2 * self.block_size * self.num_kv_heads * self.head_size * self.dtype.itemsize
