"""Paged attention in plain torch: the CPU path and the reference for the GPU kernels.

Decodes (one query token) are attended as one padded batch; prefill chunks one request at a
time, each against its cached prefix and causally within the chunk."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pagoda.attention.backend import AttentionMetadata


def write_kv(k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    num_kv_heads, head_dim = k.shape[1], k.shape[2]
    kv_cache[0].view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, k)
    kv_cache[1].view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, v)


def gather_kv(kv_cache: torch.Tensor, block_tables: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, max_blocks] block ids -> keys and values [B, num_kv_heads, max_blocks * block_size, D]."""
    num_reqs = block_tables.shape[0]
    _, _, block_size, num_kv_heads, head_dim = kv_cache.shape
    kv = kv_cache[:, block_tables.long()]  # [2, B, max_blocks, block_size, H, D]
    kv = kv.reshape(2, num_reqs, -1, num_kv_heads, head_dim).transpose(2, 3)
    return kv[0], kv[1]


class TorchAttentionBackend:
    def prepare(self, metadata: AttentionMetadata) -> None:
        rows = [i for i, n in enumerate(metadata.query_lens_cpu) if n == 1]
        if not rows:
            return
        dev = metadata.block_tables.device
        max_len = max(metadata.seq_lens_cpu[i] for i in rows)
        rows_t = torch.tensor(rows, device=dev)
        seq_lens = metadata.seq_lens[rows_t]
        metadata.backend_data["decode"] = (
            torch.tensor([metadata.query_starts_cpu[i] for i in rows], device=dev),  # token index of each
            metadata.block_tables[rows_t, : -(-max_len // metadata.block_size)],
            max_len,
            # [B, 1, 1, max_len]: which cached positions each decode may see
            (torch.arange(max_len, device=dev)[None, :] < seq_lens[:, None])[:, None, None, :],
        )

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_cache: torch.Tensor,
        metadata: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        write_kv(k, v, kv_cache, metadata.slot_mapping)
        out = torch.empty_like(q)
        if "decode" in metadata.backend_data:
            self._decode(q, kv_cache, metadata.backend_data["decode"], scale, out)
        for i, n in enumerate(metadata.query_lens_cpu):
            if n > 1:
                self._prefill(q, kv_cache, metadata, i, scale, out)
        return out

    def _decode(self, q, kv_cache, plan, scale: float, out: torch.Tensor) -> None:
        token_idx, tables, max_len, mask = plan
        keys, values = gather_kv(kv_cache, tables)
        keys, values = keys[:, :, :max_len], values[:, :, :max_len]
        query = q[token_idx].unsqueeze(2)  # [B, Hq, 1, D]
        attn = F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, scale=scale, enable_gqa=True)
        out[token_idx] = attn.squeeze(2)
    def _prefill(self, q, kv_cache, metadata, row: int, scale: float, out: torch.Tensor) -> None:
        start = metadata.query_starts_cpu[row]
        q_len, seq_len = metadata.query_lens_cpu[row], metadata.seq_lens_cpu[row]
        table = metadata.block_tables[row : row + 1, : -(-seq_len // metadata.block_size)]
        keys, values = gather_kv(kv_cache, table)
        keys, values = keys[:, :, :seq_len], values[:, :, :seq_len]
        query = q[start : start + q_len].transpose(0, 1).unsqueeze(0)  # [1, Hq, q_len, D]
        prefix = seq_len - q_len
        if prefix == 0:
            attn = F.scaled_dot_product_attention(
                query, keys, values, is_causal=True, scale=scale, enable_gqa=True
            )
        else:
            # Query i sits at position prefix + i and sees keys 0..prefix + i.
            q_pos = torch.arange(prefix, seq_len, device=q.device)[:, None]
            mask = torch.arange(seq_len, device=q.device)[None, :] <= q_pos
            attn = F.scaled_dot_product_attention(
                query, keys, values, attn_mask=mask, scale=scale, enable_gqa=True
            )
        out[start : start + q_len] = attn[0].transpose(0, 1)

