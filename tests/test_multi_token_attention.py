"""Attention over decodes with several query tokens each (a last token and its drafts): the torch
backend gives what the same tokens give one decode at a time, and the Triton kernel (natively on a
GPU, under TRITON_INTERPRET=1 on the CPU) matches the torch reference on such batches, alone and
mixed with one-token decodes and prefill chunks."""

from __future__ import annotations

import pytest
import torch
from test_triton_attention import DEVICE, DTYPES, _batch, _run

from pagoda.attention.backend import AttentionMetadata
from pagoda.attention.torch_backend import TorchAttentionBackend
from pagoda.attention.triton_backend import TritonAttentionBackend, query_tile


def _one_decode(metadata: AttentionMetadata, req: int, i: int) -> tuple[AttentionMetadata, int]:
    """The metadata of request `req`'s query token i alone, as a decode; and that token's index."""
    token = metadata.query_starts_cpu[req] + i
    seq_len = metadata.seq_lens_cpu[req] - metadata.query_lens_cpu[req] + i + 1
    return AttentionMetadata(
        slot_mapping=metadata.slot_mapping[token : token + 1],
        query_start_loc=torch.tensor([0, 1], dtype=torch.int32, device=DEVICE),
        seq_lens=torch.tensor([seq_len], dtype=torch.int32, device=DEVICE),
        block_tables=metadata.block_tables[req : req + 1],
        block_size=metadata.block_size,
        query_starts_cpu=[0],
        query_lens_cpu=[1],
        seq_lens_cpu=[seq_len],
    ), token


@pytest.mark.parametrize("num_heads, num_kv_heads", [(4, 4), (4, 2), (6, 2)])
def test_torch_queries_at_once_equal_decodes_in_turn(num_heads, num_kv_heads):
    q, k, v, cache, metadata = _batch([4, 4, 4], [3, 17, 40], num_heads, num_kv_heads, 32, 16, torch.float32, seed=1)
    together, _ = _run(TorchAttentionBackend(), q, k, v, cache, metadata)
    cache = cache.clone()
    backend = TorchAttentionBackend()
    for req in range(3):
        for i in range(4):
            single, token = _one_decode(metadata, req, i)
            backend.prepare(single)
            sl = slice(token, token + 1)
            out = backend.forward(q[sl], k[sl], v[sl], cache, single, q.shape[-1] ** -0.5)
            torch.testing.assert_close(out[0].float(), together[token], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_heads, num_kv_heads, head_dim", [(4, 2, 64), (6, 2, 32), (8, 1, 64), (3, 3, 16)])
@pytest.mark.parametrize(
    "query_lens, prefix_lens",
    [
        ([2, 2, 2], [1, 15, 47]),  # one draft each
        ([4, 4], [30, 90]),  # three drafts, contexts over several key tiles
        ([4, 1, 6, 9], [12, 20, 0, 33]),  # with a plain decode, a prompt and a chunk
    ],
)
def test_triton_multi_token_decodes_match_torch_reference(dtype, num_heads, num_kv_heads, head_dim, query_lens, prefix_lens):
    inputs = _batch(query_lens, prefix_lens, num_heads, num_kv_heads, head_dim, 16, dtype, seed=sum(query_lens))
    ref, ref_cache = _run(TorchAttentionBackend(), *inputs)
    out, cache = _run(TritonAttentionBackend(), *inputs)
    assert torch.equal(cache, ref_cache)
    tol = 2e-2 if dtype != torch.float32 else 1e-4
    assert not out.isnan().any()
    assert (out - ref).norm() / ref.norm() < tol


def test_short_queries_get_a_tile_that_fits_them():
    assert query_tile(1, 4) == 4  # a decode: 16 rows
    assert query_tile(4, 4) == 4  # a decode and 3 drafts: the same 16 rows, not 64
    assert query_tile(5, 4) == 8  # 32 rows
    assert query_tile(100, 4) == 16  # a prefill: 64 rows
    assert {query_tile(n, 3) * 3 for n in range(1, 200)} <= {15, 30, 63}  # three shapes at most
