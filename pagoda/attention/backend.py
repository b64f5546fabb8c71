"""The attention backend interface: write a step's K/V into the paged cache, then attend.

A KV cache for one layer is one tensor [2, num_blocks, block_size, num_kv_heads, head_dim]
(keys, values). A request's tokens live in the blocks its block table lists, in order. An fp8
cache (--kv-cache-dtype fp8) holds round(k / k_scale) and round(v / v_scale), saturated to the
fp8 range, and is read as fp8 * scale."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch


@dataclass
class AttentionMetadata:
    """Where the step's tokens go and what each request attends to; built once per step."""

    slot_mapping: torch.Tensor  # [num_tokens] int64: block_id * block_size + offset
    query_start_loc: torch.Tensor  # [num_reqs + 1] int32: cumulative query lengths
    seq_lens: torch.Tensor  # [num_reqs] int32: context length after this step
    block_tables: torch.Tensor  # [num_reqs, max_blocks] int32
    block_size: int
    # Host copies, so backends never sync the device to read lengths.
    query_starts_cpu: list[int]
    query_lens_cpu: list[int]
    seq_lens_cpu: list[int]
    # What a backend derives once per step (in `prepare`) and every layer reuses.
    backend_data: dict[str, Any] = field(default_factory=dict)

    @property
    def num_reqs(self) -> int:
        return len(self.seq_lens_cpu)


class AttentionBackend(Protocol):
    def prepare(self, metadata: AttentionMetadata) -> None:
        """Called once per step, before the forward pass."""
        ...

    def forward(
        self,
        q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
        k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        v: torch.Tensor,
        kv_cache: torch.Tensor,
        metadata: AttentionMetadata,
        scale: float,
        *,
        sliding_window: int | None = None,  # a query sees its last `sliding_window` tokens only
        logits_soft_cap: float | None = None,  # scores become cap * tanh(score / cap)
        kv_scales: tuple[torch.Tensor, torch.Tensor] | None = None,  # an fp8 cache's K and V scales; None: 1.0
    ) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
        ...


# The Triton kernels tile the keys a block at a time: a block is at least one tensor-core tile.
TRITON_MIN_BLOCK_SIZE = 16


def attention_backend_name(device: torch.device) -> str:
    """triton on CUDA GPUs, torch elsewhere; PAGODA_ATTENTION_BACKEND (torch | triton) overrides it."""
    choice = os.environ.get("PAGODA_ATTENTION_BACKEND") or ("triton" if device.type == "cuda" else "torch")
    if choice not in ("torch", "triton"):
        raise ValueError(f"PAGODA_ATTENTION_BACKEND={choice!r} is invalid: it must be 'torch' or 'triton'")
    return choice


def get_attention_backend(device: torch.device) -> AttentionBackend:
    """The backend attention_backend_name names (its block size was checked with the config)."""
    if attention_backend_name(device) == "triton":
        from pagoda.attention.triton_backend import TritonAttentionBackend

        return TritonAttentionBackend()
    from pagoda.attention.torch_backend import TorchAttentionBackend

    return TorchAttentionBackend(native_decode=device.type == "cpu")
