"""Bidirectional attention for encoder-only models (BERT-style): every token of a prompt attends to
every token of that prompt, and to no other prompt's. An encoder runs each prompt whole in one
step and never decodes (config/resolve.py), so the step's own keys and values are all there is
to attend to: nothing is written to or read from the paged KV cache, and the layer states no KV
cache spec (the runner's pool is then empty; worker/worker.py).

The step's prompts are gathered into one padded [prompts, longest, heads, head_dim] batch, with a
key mask where their lengths differ, so one scaled_dot_product_attention call serves them all; the
padding (computed once per step, kept in the metadata) is shared by every layer."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pagoda.attention.backend import AttentionMetadata


@dataclass(frozen=True)
class _PaddedPrompts:
    rows: torch.Tensor  # [prompts, longest]: each position's row in the flat batch (padding repeats the last)
    key_mask: torch.Tensor | None  # [prompts, 1, 1, longest]: the real keys; None when all are equally long
    real: torch.Tensor | None  # the padded batch's rows that are real tokens, in batch order


def _padded_prompts(metadata: AttentionMetadata) -> _PaddedPrompts:
    """Built on the host from the step's lengths, then copied: no layer waits on the device."""
    plan = metadata.backend_data.get("encoder")
    if plan is None:
        device = metadata.query_start_loc.device
        lens = torch.tensor(metadata.query_lens_cpu)
        longest = max(metadata.query_lens_cpu)
        offsets = torch.arange(longest)
        rows = torch.tensor(metadata.query_starts_cpu)[:, None] + torch.minimum(offsets[None, :], lens[:, None] - 1)
        key_mask = real = None
        if min(metadata.query_lens_cpu) != longest:
            is_real = offsets[None, :] < lens[:, None]
            key_mask, real = is_real[:, None, None, :].to(device), is_real.flatten().nonzero()[:, 0].to(device)
        plan = metadata.backend_data["encoder"] = _PaddedPrompts(rows.to(device), key_mask, real)
    return plan


class EncoderAttention(nn.Module):
    def __init__(self, num_heads: int, head_dim: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.scale = head_dim**-0.5

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, metadata: AttentionMetadata) -> torch.Tensor:
        """q, k, v: [T, heads, head_dim], the step's prompts one after another -> [T, heads * head_dim]."""
        plan = _padded_prompts(metadata)
        q, k, v = (x[plan.rows].transpose(1, 2) for x in (q, k, v))  # [prompts, heads, longest, head_dim]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=plan.key_mask, scale=self.scale)
        out = out.transpose(1, 2).reshape(-1, self.num_heads * self.head_dim)
        return out if plan.real is None else out.index_select(0, plan.real)
