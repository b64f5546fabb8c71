"""The torch attention backend reads a request's keys and values in place when its blocks are one
ascending run of the pool (attention/torch_backend.py, block_run), and gives what gathering them
gives, bit for bit: a decode, a chunk over a cached prefix, a whole prompt, a sliding window, an
fp8 cache."""

from __future__ import annotations

import pytest
import torch
from test_triton_attention import _batch

from pagoda.attention.backend import AttentionMetadata
from pagoda.attention.torch_backend import TorchAttentionBackend, block_run

BLOCK = 16


def _as_one_run(cache: torch.Tensor, metadata: AttentionMetadata, start: int) -> tuple[torch.Tensor, AttentionMetadata]:
    """The same one-request batch with its blocks moved to start, start + 1, ... of the pool."""
    n = -(-metadata.seq_lens_cpu[0] // BLOCK)
    table = metadata.block_tables[0, :n].long()
    moved = torch.zeros_like(cache)
    moved[:, start : start + n] = cache[:, table]
    where = {int(b): start + i for i, b in enumerate(table)}
    slots = torch.tensor([where[int(s) // BLOCK] * BLOCK + int(s) % BLOCK for s in metadata.slot_mapping])
    run = AttentionMetadata(
        slot_mapping=slots, query_start_loc=metadata.query_start_loc, seq_lens=metadata.seq_lens,
        block_tables=torch.arange(start, start + n, dtype=torch.int32)[None], block_size=BLOCK,
        query_starts_cpu=metadata.query_starts_cpu, query_lens_cpu=metadata.query_lens_cpu,
        seq_lens_cpu=metadata.seq_lens_cpu,
    )
    return moved, run


def _attend(q, k, v, cache, metadata, **kwargs) -> torch.Tensor:
    backend = TorchAttentionBackend()
    metadata.backend_data = {}
    backend.prepare(metadata)
    return backend.forward(q, k, v, cache.clone(), metadata, q.shape[-1] ** -0.5, **kwargs)


def test_a_run_is_found_only_where_the_blocks_ascend_one_by_one():
    assert block_run(torch.tensor([4, 5, 6, 7])) == slice(4, 8)
    assert block_run(torch.tensor([9])) == slice(9, 10)
    assert block_run(torch.tensor([4, 5, 7, 8])) is None
    assert block_run(torch.tensor([5, 4])) is None


@pytest.mark.parametrize("query_len, prefix_len", [(1, 70), (1, 15), (9, 40), (20, 0)], ids=["decode", "decode-1-block", "chunk", "prompt"])
@pytest.mark.parametrize("window", [None, 24])
@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.float8_e4m3fn])
def test_keys_read_in_place_give_what_the_gather_gives(query_len, prefix_len, window, cache_dtype):
    q, k, v, cache, metadata = _batch([query_len], [prefix_len], 6, 2, 64, BLOCK, torch.float32, seed=prefix_len)
    cache = cache.to(cache_dtype)
    moved, run = _as_one_run(cache, metadata, start=2)
    gathered = _attend(q, k, v, cache, metadata, sliding_window=window)
    in_place = _attend(q, k, v, moved, run, sliding_window=window)
    def used(m: AttentionMetadata) -> slice | None:
        return m.backend_data["decode"].run if query_len == 1 else m.backend_data["prefill_runs"][0]

    assert used(run) == slice(2, 2 + run.block_tables.shape[1])
    assert used(metadata) is None or run.block_tables.shape[1] == 1  # scattered blocks: gathered
    assert torch.equal(in_place, gathered)
