"""CUDA graphs for decode steps.

A decode step of a small batch launches a few hundred small kernels, and replaying them from a
graph costs a fraction of launching them from Python. Graphs are captured once, at start-up, for
a ladder of batch sizes; a batch is padded up to the next captured size. Inputs live in static
buffers the graphs read; padding rows write their K/V into a scratch block that no request owns
and attend only to it, and their outputs are dropped."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

import torch

from pagoda.attention.backend import AttentionBackend, AttentionMetadata

logger = logging.getLogger("pagoda")

ForwardFn = Callable[[torch.Tensor, torch.Tensor, AttentionMetadata], torch.Tensor]


def capture_sizes(max_num_seqs: int) -> list[int]:
    """1, 2, 4, then every multiple of 8, up to the first size that holds max_num_seqs (at most 512)."""
    ladder = [1, 2, 4, *range(8, 513, 8)]
    limit = next((s for s in ladder if s >= max_num_seqs), ladder[-1])
    return [s for s in ladder if s <= limit]


class DecodeGraphs:
    def __init__(
        self,
        forward: ForwardFn,
        backend: AttentionBackend,
        *,
        sizes: Sequence[int],
        block_size: int,
        max_blocks_per_seq: int,
        scratch_block: int,
        device: torch.device,
    ) -> None:
        self.forward = forward
        self.backend = backend
        self.sizes = sorted(sizes)
        self.block_size = block_size
        self.scratch_block = scratch_block
        self.device = device
        n = self.sizes[-1]
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=device)
        self.positions = torch.zeros(n, dtype=torch.int64, device=device)
        self.slot_mapping = torch.full((n,), scratch_block * block_size, dtype=torch.int64, device=device)
        self.query_start_loc = torch.arange(n + 1, dtype=torch.int32, device=device)  # one token each
        self.seq_lens = torch.ones(n, dtype=torch.int32, device=device)
        self.block_tables = torch.full((n, max_blocks_per_seq), scratch_block, dtype=torch.int32, device=device)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}

    @property
    def max_batch(self) -> int:
        return self.sizes[-1]

    def capture(self) -> int:
        """Capture every size's graph; returns the device memory they hold, in bytes."""
        started = time.perf_counter()
        torch.cuda.empty_cache()  # torch.cuda.graph() empties the cache: measure from an empty one
        free_before = torch.cuda.mem_get_info(self.device)[0]
        pool = None
        # Largest first: smaller graphs then fit in the memory the first one reserved.
        for size in reversed(self.sizes):
            metadata = self._metadata(size)
            self.forward(self.input_ids[:size], self.positions[:size], metadata)  # warm-up: JIT, workspaces
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                hidden = self.forward(self.input_ids[:size], self.positions[:size], metadata)
            pool = graph.pool()
            self.graphs[size] = (graph, hidden)
        torch.cuda.synchronize()
        used = free_before - torch.cuda.mem_get_info(self.device)[0]
        logger.info(
            "captured %d decode CUDA graphs (batch %d..%d) in %.1f s, %.2f GiB", len(self.sizes), self.sizes[0],
            self.max_batch, time.perf_counter() - started, used / 2**30,
        )
        return used

    def run(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        slot_mapping: torch.Tensor,
        seq_lens: torch.Tensor,
        block_tables: torch.Tensor,
    ) -> torch.Tensor:
        """One decode step, one row per request -> hidden states [B, hidden]. The inputs are device
        tensors or pinned host tensors, so that copying them in does not wait for the device."""
        num_reqs = input_ids.shape[0]
        size = next(s for s in self.sizes if s >= num_reqs)
        self.input_ids[:num_reqs].copy_(input_ids, non_blocking=True)
        self.positions[:num_reqs].copy_(positions, non_blocking=True)
        self.slot_mapping[:num_reqs].copy_(slot_mapping, non_blocking=True)
        self.seq_lens[:num_reqs].copy_(seq_lens, non_blocking=True)
        self.block_tables[:num_reqs, : block_tables.shape[1]].copy_(block_tables, non_blocking=True)
        # Rows past the batch may hold an earlier, larger step's requests: make them padding again.
        self.slot_mapping[num_reqs:size].fill_(self.scratch_block * self.block_size)
        self.seq_lens[num_reqs:size].fill_(1)
        self.block_tables[num_reqs:size, 0].fill_(self.scratch_block)
        graph, hidden = self.graphs[size]
        graph.replay()
        return hidden[:num_reqs]

    def _metadata(self, size: int) -> AttentionMetadata:
        metadata = AttentionMetadata(
            slot_mapping=self.slot_mapping[:size],
            query_start_loc=self.query_start_loc[: size + 1],
            seq_lens=self.seq_lens[:size],
            block_tables=self.block_tables[:size],
            block_size=self.block_size,
            query_starts_cpu=list(range(size)),
            query_lens_cpu=[1] * size,
            seq_lens_cpu=[1] * size,  # a captured graph reads the device lengths, never these
        )
        self.backend.prepare(metadata)
        return metadata
