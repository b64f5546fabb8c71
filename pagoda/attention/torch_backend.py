"""Paged attention in plain torch: the CPU path and the reference for the GPU kernels.

Decodes (one query token) are attended as one padded batch; prefill chunks one request at a
time, each against its cached prefix and causally within the chunk. A sliding-window layer masks
the keys older than its window; a soft-capped layer (Gemma 2) computes the scores itself, since
scaled_dot_product_attention cannot cap them. An fp8 cache is quantized as it is written and
dequantized to the query's dtype as it is read (pagoda/attention/kv_fp8.py)."""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pagoda.attention.backend import AttentionMetadata
from pagoda.attention.kv_fp8 import dequantize, is_fp8, quantize
from pagoda.kernels import cpu_native

KVScales = tuple[torch.Tensor, torch.Tensor] | None


def write_kv(
    k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor, kv_scales: KVScales = None
) -> None:
    """k, v: [T, Hkv, D] into their slots (one copy for both); an fp8 cache gets them divided by its scales."""
    num_kv_heads, head_dim = k.shape[1], k.shape[2]
    rows = kv_cache.view(2, -1, num_kv_heads, head_dim)
    if is_fp8(kv_cache.dtype):
        k, v = (quantize(x, kv_scales and kv_scales[i], kv_cache.dtype) for i, x in enumerate((k, v)))
        # As bytes: index_copy_ has no float8 kernel on the CPU (nor on CUDA in every release).
        rows, k, v = rows.view(torch.uint8), k.view(torch.uint8), v.view(torch.uint8)
    rows.index_copy_(1, slot_mapping, torch.stack((k, v)).to(rows.dtype))


def gather_kv(
    kv_cache: torch.Tensor, block_tables: torch.Tensor, run: slice | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, max_blocks] block ids -> keys and values [B, num_kv_heads, max_blocks * block_size, D].
    run: the blocks' ids as one ascending run (one row only, `block_run`), read in place: no copy."""
    if run is not None:
        _, _, block_size, num_kv_heads, head_dim = kv_cache.shape
        kv = kv_cache[:, run].view(2, 1, -1, num_kv_heads, head_dim).transpose(2, 3)
        return kv[0], kv[1]
    num_reqs = block_tables.shape[0]
    _, _, block_size, num_kv_heads, head_dim = kv_cache.shape
    # An fp8 cache is indexed as bytes: CUDA's indexing has no float8 kernel in every torch release.
    storage = kv_cache.view(torch.uint8) if is_fp8(kv_cache.dtype) else kv_cache
    # index_select, not indexing with the table: timed inside the CPU engine, 38 against 48 us a
    # layer at one stream and 144 against 168 us at 16 (isolated calls exaggerate it: 4-11x).
    kv = storage.index_select(1, block_tables.flatten()).view(kv_cache.dtype)  # [2, B * max_blocks, block_size, H, D]
    kv = kv.view(2, num_reqs, -1, num_kv_heads, head_dim).transpose(2, 3)
    return kv[0], kv[1]


def block_run(table: torch.Tensor) -> slice | None:
    """A request's block ids [n] as the slice of the pool they cover, when they are one ascending
    run (blocks handed out in turn to a request that grows alone): its keys and values are then
    read in place, where a gather copies the whole context in every layer (a 4,000-token context
    of the default model: 6 MB a layer, each step). CPU tables only: reading one is a device sync."""
    if table.device.type != "cpu":
        return None
    first = int(table[0])
    run = slice(first, first + len(table))
    return run if torch.equal(table, torch.arange(run.start, run.stop, dtype=table.dtype, device=table.device)) else None


@dataclass(frozen=True)
class _DecodePlan:
    """What every layer's decode rows share in one step, built once in `prepare` (a step runs
    the same decode over every layer: per-layer index and mask ops were most of its host cost)."""

    token_idx: torch.Tensor | None  # each decode's row in the batch; None: every row is a decode, in order
    block_tables: torch.Tensor  # [B, blocks covering the longest], int64 (what indexing takes)
    max_len: int
    seq_lens: torch.Tensor  # [B]
    causal: torch.Tensor | None  # [B, 1, 1, max_len]: the cached positions each decode sees, windows aside
    run: slice | None  # one decode whose blocks are one run of the pool (block_run): read in place
    # Every row a decode on the CPU, with the C function built: float32 layers without a window
    # or a soft cap attend through it (pagoda/kernels/cpu_native.py), their pool float32,
    # bfloat16 or float16.
    native: ctypes.CDLL | None


class TorchAttentionBackend:
    def __init__(self, native_decode: bool = False) -> None:
        """native_decode: steps of decodes only on the CPU attend through the C function where it
        builds (pagoda/kernels/cpu_native.py), built here rather than in a request's first step;
        the reference in tests is torch ops alone."""
        self.native_decode = native_decode and cpu_native.load() is not None

    def prepare(self, metadata: AttentionMetadata) -> None:
        metadata.backend_data["prefill_runs"] = {
            i: block_run(metadata.block_tables[i, : -(-metadata.seq_lens_cpu[i] // metadata.block_size)])
            for i, n in enumerate(metadata.query_lens_cpu) if n > 1
        }
        rows = [i for i, n in enumerate(metadata.query_lens_cpu) if n == 1]
        if not rows:
            return
        dev = metadata.block_tables.device
        max_len = max(metadata.seq_lens_cpu[i] for i in rows)
        every_row = len(rows) == len(metadata.query_lens_cpu)
        tables = metadata.block_tables if every_row else metadata.block_tables[torch.tensor(rows, device=dev)]
        seq_lens = metadata.seq_lens if every_row else metadata.seq_lens[torch.tensor(rows, device=dev)]
        # Each decode sits at position seq_len - 1; when all are max_len long (one stream, or
        # equal lengths) each sees every gathered position: no mask for attention to convert.
        causal = None
        if any(metadata.seq_lens_cpu[i] != max_len for i in rows):
            causal = _visible(seq_lens[:, None] - 1, torch.arange(max_len, device=dev), None)[:, None, None, :]
        tables = tables[:, : -(-max_len // metadata.block_size)].long()
        metadata.backend_data["decode"] = _DecodePlan(
            token_idx=None if every_row else torch.tensor([metadata.query_starts_cpu[i] for i in rows], device=dev),
            block_tables=tables,
            max_len=max_len,
            seq_lens=seq_lens,
            causal=causal,
            run=block_run(tables[0]) if len(rows) == 1 else None,
            native=cpu_native.load() if self.native_decode and every_row and dev.type == "cpu" else None,
        )

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_cache: torch.Tensor,
        metadata: AttentionMetadata,
        scale: float,
        *,
        sliding_window: int | None = None,
        logits_soft_cap: float | None = None,
        kv_scales: KVScales = None,
    ) -> torch.Tensor:
        native = self.c_decode(metadata, kv_cache, sliding_window, logits_soft_cap)
        if native is not None and q.dtype == torch.float32:
            return cpu_native.decode_attention(
                native, q, k, v, kv_cache, metadata.slot_mapping, metadata.block_tables, metadata.seq_lens, scale
            )
        plan: _DecodePlan | None = metadata.backend_data.get("decode")
        write_kv(k, v, kv_cache, metadata.slot_mapping, kv_scales)
        layer = _Layer(scale, sliding_window, logits_soft_cap, kv_scales)
        if plan is not None and plan.token_idx is None:  # a step of decodes only
            return self._decode(q, kv_cache, plan, layer)
        out = torch.empty_like(q)
        if plan is not None:
            out[plan.token_idx] = self._decode(q, kv_cache, plan, layer)
        for i, n in enumerate(metadata.query_lens_cpu):
            if n > 1:
                self._prefill(q, kv_cache, metadata, i, layer, out)
        return out

    def c_decode(
        self, metadata: AttentionMetadata, kv_cache: torch.Tensor, sliding_window: int | None = None,
        logits_soft_cap: float | None = None,
    ) -> ctypes.CDLL | None:
        """The C library where a layer of this step (float32 queries) attends in it
        (cpu_native.decode_attention): every row a decode on the CPU, a pool it reads, no window or
        soft cap; else None."""
        plan: _DecodePlan | None = metadata.backend_data.get("decode")
        if (
            plan is None or plan.native is None or sliding_window is not None or logits_soft_cap is not None
            or not cpu_native.decode_attends(plan.native, kv_cache.dtype) or not kv_cache.is_contiguous()
        ):
            return None
        return plan.native

    def _decode(self, q, kv_cache, plan: _DecodePlan, layer: _Layer) -> torch.Tensor:
        """The decode rows' attention output, [B, Hq, D]."""
        keys, values = gather_kv(kv_cache, plan.block_tables, plan.run)
        max_len = plan.max_len
        keys, values = _read((keys[:, :, :max_len], values[:, :, :max_len]), layer.kv_scales, q.dtype)
        mask = plan.causal
        if layer.sliding_window is not None:
            k_pos = torch.arange(max_len, device=q.device)
            mask = _visible(plan.seq_lens[:, None] - 1, k_pos, layer.sliding_window)[:, None, None, :]
        query = q if plan.token_idx is None else q[plan.token_idx]  # [B, Hq, D]
        # Each KV head's group of query heads as that head's query rows, [B, Hkv, group, D]:
        # attention then reads each key once, where enable_gqa would copy the keys and values
        # for every head of the group (a decode layer 70 -> 49 us at one stream of 140 tokens,
        # 808 -> 639 us at 16 streams, for the default model's 9 query and 3 KV heads).
        batch, num_heads, head_dim = query.shape
        grouped = query.view(batch, keys.shape[1], num_heads // keys.shape[1], head_dim)
        return _attend(grouped, keys, values, mask, layer).reshape(batch, num_heads, head_dim)

    def _prefill(self, q, kv_cache, metadata, row: int, layer: _Layer, out: torch.Tensor) -> None:
        start = metadata.query_starts_cpu[row]
        q_len, seq_len = metadata.query_lens_cpu[row], metadata.seq_lens_cpu[row]
        table = metadata.block_tables[row : row + 1, : -(-seq_len // metadata.block_size)]
        keys, values = gather_kv(kv_cache, table, metadata.backend_data.get("prefill_runs", {}).get(row))
        keys, values = _read((keys[:, :, :seq_len], values[:, :, :seq_len]), layer.kv_scales, q.dtype)
        query = q[start : start + q_len].transpose(0, 1).unsqueeze(0)  # [1, Hq, q_len, D]
        prefix = seq_len - q_len
        if prefix == 0 and layer.sliding_window is None and layer.logits_soft_cap is None:
            attn = F.scaled_dot_product_attention(
                query, keys, values, is_causal=True, scale=layer.scale, enable_gqa=True
            )
        else:
            # Query i sits at position prefix + i.
            q_pos = torch.arange(prefix, seq_len, device=q.device)[:, None]
            mask = _visible(q_pos, torch.arange(seq_len, device=q.device), layer.sliding_window)
            attn = _attend(query, keys, values, mask, layer)
        out[start : start + q_len] = attn[0].transpose(0, 1)


@dataclass(frozen=True)
class _Layer:
    scale: float
    sliding_window: int | None
    logits_soft_cap: float | None
    kv_scales: KVScales


def _read(kv: tuple[torch.Tensor, torch.Tensor], kv_scales: KVScales, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """Gathered keys and values as `dtype`: an fp8 cache's times its scales."""
    if not is_fp8(kv[0].dtype):
        return tuple(x.to(dtype) for x in kv)
    return tuple(dequantize(x, kv_scales and kv_scales[i], dtype) for i, x in enumerate(kv))


def _visible(q_pos: torch.Tensor, k_pos: torch.Tensor, sliding_window: int | None) -> torch.Tensor:
    """[.., Q, 1] query positions x [K] key positions -> whether the query sees the key: causal,
    and within the last `sliding_window` tokens (itself included)."""
    mask = k_pos <= q_pos
    return mask if sliding_window is None else mask & (k_pos > q_pos - sliding_window)


def _attend(query, keys, values, mask: torch.Tensor | None, layer: _Layer) -> torch.Tensor:
    """query [B, Hq, Q, D], keys/values [B, Hkv, K, D], mask broadcastable to [B, Hq, Q, K] (None:
    every key visible)."""
    if layer.logits_soft_cap is None:
        return F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, scale=layer.scale, enable_gqa=True)
    group = query.shape[1] // keys.shape[1]
    keys, values = keys.repeat_interleave(group, dim=1), values.repeat_interleave(group, dim=1)
    scores = (query @ keys.transpose(-1, -2)) * layer.scale
    cap = layer.logits_soft_cap
    scores = torch.tanh(scores / cap) * cap
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32)
    return probs.to(values.dtype) @ values

