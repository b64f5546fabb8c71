"""CUDA graphs for decode steps.

A decode step of a small batch launches a few hundred small kernels, and replaying them from a
graph costs a fraction of launching them from Python. Graphs are captured once, at start-up, for
a ladder of batch sizes; a batch is padded up to the next captured size. Inputs live in static
buffers the graphs read; padding rows write their K/V into a scratch block that no request owns
and attend only to it, and their outputs are dropped.

With a token proposer, a decode step may give every request 1 + k query tokens (its last token
and k drafts): graphs are then captured for each query length in `query_lens` too, into the same
memory pool, and a step replays one when all of its requests have that many query tokens."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

import torch

from pagoda.attention.backend import AttentionBackend, AttentionMetadata

logger = logging.getLogger("pagoda")

# -> the hidden states, or (them, the aux layers' hidden states) for an EAGLE-3 target.
ForwardOutput = torch.Tensor | tuple[torch.Tensor, torch.Tensor]
ForwardFn = Callable[[torch.Tensor, torch.Tensor, AttentionMetadata], ForwardOutput]


# The shapes run eagerly before their capture: the largest (the first captured), for what a capture
# cannot do (cuBLAS's handles and workspaces), and those of up to 4 tokens, where 4-bit layers switch
# kernels (the GEMV at one row, which makes its workspace then: kernels/w4a16_gemv.py; tinygemm up to
# 4). The others' kernels load or compile inside their captures, which Triton and cuBLAS allow (vLLM
# captures with no eager runs by default): an eager forward less for each.
EAGER_RUN_TOKENS = 4


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
        query_lens: Sequence[int] = (1,),
    ) -> None:
        self.forward = forward
        self.backend = backend
        self.sizes = sorted(sizes)
        self.query_lens = sorted(query_lens)  # query tokens per request, the same for every request
        self.block_size = block_size
        self.scratch_block = scratch_block
        self.device = device
        n = self.sizes[-1]
        t = n * self.query_lens[-1]
        self.input_ids = torch.zeros(t, dtype=torch.int64, device=device)
        self.positions = torch.zeros(t, dtype=torch.int64, device=device)
        self.slot_mapping = torch.full((t,), scratch_block * block_size, dtype=torch.int64, device=device)
        # Cumulative query lengths never change for a given query length: one static tensor each.
        self.query_start_locs = {
            q: torch.arange(0, q * n + 1, q, dtype=torch.int32, device=device) for q in self.query_lens
        }
        self.seq_lens = torch.full((n,), self.query_lens[-1], dtype=torch.int32, device=device)
        self.block_tables = torch.full((n, max_blocks_per_seq), scratch_block, dtype=torch.int32, device=device)
        # (query tokens per request, batch size) -> the graph and its output buffer
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, ForwardOutput]] = {}

    @property
    def max_batch(self) -> int:
        return self.sizes[-1]

    def captures(self, query_lens: list[int], num_tokens: int) -> bool:
        """Whether a step of these query lengths (num_tokens in all) replays a graph: at most
        max_batch requests, each with the same captured number of query tokens."""
        num_reqs = len(query_lens)
        if num_reqs > self.max_batch:
            return False
        if num_tokens == num_reqs:  # every request decodes one token: the common step
            return True
        q = query_lens[0]
        return num_tokens == q * num_reqs and q in self.query_lens and query_lens.count(q) == num_reqs

    def capture(self) -> int:
        """Capture every size's graph; returns the device memory they hold, in bytes."""
        started = time.perf_counter()
        torch.cuda.empty_cache()  # torch.cuda.graph() empties the cache: measure from an empty one
        free_before = torch.cuda.mem_get_info(self.device)[0]
        pool = None
        # Most tokens first: smaller graphs then fit in the memory the first one reserved.
        shapes = sorted(((q, size) for q in self.query_lens for size in self.sizes), key=lambda s: s[0] * s[1])
        for i, (q, size) in enumerate(reversed(shapes)):
            metadata = self._metadata(q, size)
            ids, pos = self.input_ids[: q * size], self.positions[: q * size]
            if i == 0 or q * size <= EAGER_RUN_TOKENS:
                self.forward(ids, pos, metadata)  # before its capture: see EAGER_RUN_TOKENS
                torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                hidden = self.forward(ids, pos, metadata)
            pool = graph.pool()
            self.graphs[q, size] = (graph, hidden)
        torch.cuda.synchronize()
        used = free_before - torch.cuda.mem_get_info(self.device)[0]
        logger.info(
            "captured %d decode CUDA graphs (batch %d..%d, query tokens per request %s) in %.1f s, %.2f GiB",
            len(shapes), self.sizes[0], self.max_batch, "/".join(map(str, self.query_lens)),
            time.perf_counter() - started, used / 2**30,
        )
        return used

    def run(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        slot_mapping: torch.Tensor,
        seq_lens: torch.Tensor,
        block_tables: torch.Tensor,
    ) -> ForwardOutput:
        """One step of B requests with q query tokens each (a step `captures` accepts) -> hidden
        states [B * q, hidden] (and the aux ones, where the forward gives them). The inputs are
        device tensors or pinned host tensors, so that copying them in does not wait for the device."""
        num_reqs, num_tokens = seq_lens.shape[0], input_ids.shape[0]
        q = num_tokens // num_reqs
        size = next(s for s in self.sizes if s >= num_reqs)
        self.input_ids[:num_tokens].copy_(input_ids, non_blocking=True)
        self.positions[:num_tokens].copy_(positions, non_blocking=True)
        self.slot_mapping[:num_tokens].copy_(slot_mapping, non_blocking=True)
        self.seq_lens[:num_reqs].copy_(seq_lens, non_blocking=True)
        self.block_tables[:num_reqs, : block_tables.shape[1]].copy_(block_tables, non_blocking=True)
        # Rows past the batch may hold an earlier, larger step's requests: make them padding again
        # (q tokens at positions 0..q-1 of the scratch block, all writing into its first slot).
        self.slot_mapping[num_tokens : q * size].fill_(self.scratch_block * self.block_size)
        self.seq_lens[num_reqs:size].fill_(q)
        self.block_tables[num_reqs:size, 0].fill_(self.scratch_block)
        graph, hidden = self.graphs[q, size]
        graph.replay()
        if isinstance(hidden, tuple):
            return hidden[0][:num_tokens], hidden[1][:num_tokens]
        return hidden[:num_tokens]

    def _metadata(self, q: int, size: int) -> AttentionMetadata:
        metadata = AttentionMetadata(
            slot_mapping=self.slot_mapping[: q * size],
            query_start_loc=self.query_start_locs[q][: size + 1],
            seq_lens=self.seq_lens[:size],
            block_tables=self.block_tables[:size],
            block_size=self.block_size,
            query_starts_cpu=list(range(0, q * size, q)),
            query_lens_cpu=[q] * size,
            seq_lens_cpu=[q] * size,  # a captured graph reads the device lengths, never these
        )
        self.backend.prepare(metadata)
        return metadata
