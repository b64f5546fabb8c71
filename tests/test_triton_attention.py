"""The Triton paged-attention kernel against the torch reference, on random inputs: mixed batches
of decodes, prefill chunks over a cached prefix and whole prompts; GQA groups including ones that
are not powers of two. On a GPU it runs natively in fp16/bf16; on the CPU under TRITON_INTERPRET=1
in fp32 on small shapes."""

from __future__ import annotations

import pytest
import torch

from tests.kernel_device import DEVICE, ON_GPU, require_kernels

require_kernels()

from pagoda.attention.backend import AttentionMetadata  # noqa: E402
from pagoda.attention.torch_backend import TorchAttentionBackend  # noqa: E402
from pagoda.attention.triton_backend import TritonAttentionBackend  # noqa: E402

DTYPES = [torch.float16, torch.bfloat16] if ON_GPU else [torch.float32]


def _batch(query_lens, prefix_lens, num_heads, num_kv_heads, head_dim, block_size, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    seq_lens = [q + p for q, p in zip(query_lens, prefix_lens)]
    blocks_per_req = [-(-s // block_size) for s in seq_lens]
    num_blocks = sum(blocks_per_req) + 3
    order = torch.randperm(num_blocks, generator=g).tolist()  # scattered, not contiguous, blocks
    tables, slots, used = [], [], 0
    for n, s, q in zip(blocks_per_req, seq_lens, query_lens):
        table = order[used : used + n]
        used += n
        tables.append(table + [0] * (max(blocks_per_req) - n))
        slots.extend(table[p // block_size] * block_size + p % block_size for p in range(s - q, s))
    starts = [0]
    for q in query_lens:
        starts.append(starts[-1] + q)
    cache = torch.randn(2, num_blocks, block_size, num_kv_heads, head_dim, generator=g).to(DEVICE, dtype)
    t = starts[-1]
    q, k, v = (torch.randn(t, h, head_dim, generator=g).to(DEVICE, dtype) for h in (num_heads, num_kv_heads, num_kv_heads))
    metadata = AttentionMetadata(
        slot_mapping=torch.tensor(slots, device=DEVICE),
        query_start_loc=torch.tensor(starts, dtype=torch.int32, device=DEVICE),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE),
        block_tables=torch.tensor(tables, dtype=torch.int32, device=DEVICE),
        block_size=block_size,
        query_starts_cpu=starts[:-1],
        query_lens_cpu=list(query_lens),
        seq_lens_cpu=seq_lens,
    )
    return q, k, v, cache, metadata


def _run(backend, q, k, v, cache, metadata):
    cache = cache.clone()
    metadata.backend_data = {}
    backend.prepare(metadata)
    out = backend.forward(q, k, v, cache, metadata, q.shape[-1] ** -0.5)
    return out.float(), cache


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "num_heads, num_kv_heads, head_dim, block_size",
    # 96: prefill tiles hold the head dim in two halves (triton_backend's SPLIT_D), the second one partly masked.
    [(4, 4, 64, 16), (4, 2, 64, 16), (6, 2, 64, 32), (8, 1, 128, 16), (8, 2, 8, 16), (4, 2, 96, 16)]
    + ([(28, 4, 128, 16), (8, 2, 256, 32)] if ON_GPU else []),
)
@pytest.mark.parametrize(
    "query_lens, prefix_lens",
    [
        ([1, 1, 1], [5, 17, 40]),  # decodes only
        ([1, 3], [150, 70]),  # contexts spanning several key tiles
        ([1, 7, 20, 1], [33, 0, 9, 0]),  # decodes, a chunk over a cached prefix, whole prompts
    ],
)
def test_triton_matches_torch_reference(dtype, num_heads, num_kv_heads, head_dim, block_size, query_lens, prefix_lens):
    inputs = _batch(query_lens, prefix_lens, num_heads, num_kv_heads, head_dim, block_size, dtype, seed=len(query_lens))
    ref, ref_cache = _run(TorchAttentionBackend(), *inputs)
    out, cache = _run(TritonAttentionBackend(), *inputs)
    assert torch.equal(cache, ref_cache)  # K/V written to the same slots
    tol = 2e-2 if dtype != torch.float32 else 1e-4
    assert not out.isnan().any()
    assert (out - ref).norm() / ref.norm() < tol


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_splits", [2, 3, 7])
@pytest.mark.parametrize("num_heads, num_kv_heads, head_dim", [(8, 2, 64), (6, 3, 32)])
def test_split_decodes_match_torch_reference(monkeypatch, dtype, num_splits, num_heads, num_kv_heads, head_dim):
    """Decodes whose keys are split across programs, lengths from under one key tile per split (so
    some splits are empty) to many tiles, equal the reference once the splits are combined."""
    from pagoda.attention import triton_backend

    monkeypatch.setattr(triton_backend, "decode_splits", lambda *args: num_splits)
    inputs = _batch([1, 1, 1, 1], [0, 9, 140, 300], num_heads, num_kv_heads, head_dim, 16, dtype, seed=num_splits)
    ref, _ = _run(TorchAttentionBackend(), *inputs)
    out, _ = _run(TritonAttentionBackend(), *inputs)
    tol = 2e-2 if dtype != torch.float32 else 1e-4
    assert not out.isnan().any()
    assert (out - ref).norm() / ref.norm() < tol


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rising", [True, False])
@pytest.mark.parametrize("num_splits", [1, 3])
def test_scores_rising_or_falling_along_the_keys_match_torch_reference(monkeypatch, dtype, rising, num_splits):
    """The online softmax across many key tiles, most of them unmasked: cached keys scaled 1x to
    4x along the sequence raise each row's max tile after tile (the running sums rescaled each
    time), keys scaled 4x to 1x set it in the first tile for good."""
    from pagoda.attention import triton_backend

    monkeypatch.setattr(triton_backend, "decode_splits", lambda *args: num_splits)
    query_lens, prefix_lens = [1, 1, 6], [300, 140, 200]
    q, k, v, cache, metadata = _batch(query_lens, prefix_lens, 8, 2, 32, 16, dtype, seed=5)
    for table, prefix in zip(metadata.block_tables.tolist(), prefix_lens):
        ramp = torch.linspace(1.0, 4.0, prefix) if rising else torch.linspace(4.0, 1.0, prefix)
        for position, factor in enumerate(ramp.tolist()):
            cache[0, table[position // 16], position % 16] *= factor
    ref, _ = _run(TorchAttentionBackend(), q, k, v, cache, metadata)
    out, _ = _run(TritonAttentionBackend(), q, k, v, cache, metadata)
    tol = 2e-2 if dtype != torch.float32 else 1e-4
    assert not out.isnan().any()
    assert (out - ref).norm() / ref.norm() < tol


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "sliding_window, soft_cap", [(8, None), (40, None), (56, None), (1000, None), (None, 30.0), (40, 30.0)]
)
@pytest.mark.parametrize("num_splits", [1, 3])
def test_windows_and_soft_caps_match_torch_reference(monkeypatch, dtype, sliding_window, soft_cap, num_splits):
    """Sliding windows shorter than a key tile, spanning a few tiles, and longer than every
    context, and soft-capped scores, over decodes (split across programs or not) and chunks over
    a cached prefix (the kernel starts each program at the oldest key its window reaches). A
    56-token window over the last batch puts a key tile's first key one short of the window of
    its query tile's last row: that tile must be masked."""
    from pagoda.attention import triton_backend

    monkeypatch.setattr(triton_backend, "decode_splits", lambda *args: num_splits)
    layer = dict(sliding_window=sliding_window, logits_soft_cap=soft_cap)
    batches = (([1, 1, 1, 1], [5, 64, 150, 300]), ([1, 7, 20, 1], [150, 33, 9, 70]), ([16, 32], [73, 57]))
    for query_lens, prefix_lens in batches:
        q, k, v, cache, metadata = _batch(query_lens, prefix_lens, 8, 2, 32, 16, dtype, seed=num_splits)
        outs = []
        for backend in (TorchAttentionBackend(), TritonAttentionBackend()):
            metadata.backend_data = {}
            backend.prepare(metadata)
            outs.append(backend.forward(q, k, v, cache.clone(), metadata, 32**-0.5, **layer).float())
        ref, out = outs
        tol = 2e-2 if dtype != torch.float32 else 1e-4
        assert not out.isnan().any()
        assert (out - ref).norm() / ref.norm() < tol


def test_decode_splits_fill_the_gpu_only_for_small_batches():
    from pagoda.attention.triton_backend import decode_splits

    assert decode_splits(256 * 8, 1024, num_sms=132) == 1  # W1's decodes: 2,048 programs already
    assert decode_splits(1 * 8, 32768, num_sms=132) == 33  # one long request: 264 programs
    assert decode_splits(1 * 8, 1024, num_sms=132) == 8  # short: splits of at least 128 keys
    assert decode_splits(1 * 8, 200, num_sms=132) == 1
    assert decode_splits(16 * 8, 8192, num_sms=132) == 2  # 16 requests: twice over already
    assert decode_splits(1, 10**6, num_sms=132) == 64


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_heads, num_kv_heads, head_dim", [(8, 2, 64), (4, 4, 32)])
@pytest.mark.parametrize("has_lse_attention", [True, False])
def test_long_prefill_steps_match_torch_reference(
    monkeypatch, dtype, num_heads, num_kv_heads, head_dim, has_lse_attention
):
    """A step of long prompt chunks only (lowered threshold), whole prompts and chunks over a
    cached prefix (their two fused calls merged by log-sum-exp), through the fused-attention path
    equals the reference; a step with a decode in it stays in the paged kernel, and so does a
    chunk over a prefix where the fused kernel with log-sum-exps is missing."""
    from pagoda.attention import triton_backend

    monkeypatch.setattr(triton_backend, "SDPA_MIN_QUERY_LEN", 24)
    monkeypatch.setattr(triton_backend, "_has_attention_with_lse", lambda device, head_dim, dtype: has_lse_attention)
    fused_calls = []
    fused = triton_backend.long_prefill_attention
    monkeypatch.setattr(triton_backend, "long_prefill_attention", lambda *a: fused_calls.append(1) or fused(*a))
    for query_lens, prefix_lens, goes_fused in (
        ([40, 24], [0, 50], has_lse_attention), ([30], [70], has_lse_attention), ([40, 30], [0, 0], True),
        ([40, 1], [0, 9], False),
    ):
        inputs = _batch(query_lens, prefix_lens, num_heads, num_kv_heads, head_dim, 16, dtype, seed=len(query_lens))
        ref, ref_cache = _run(TorchAttentionBackend(), *inputs)
        fused_calls.clear()
        out, cache = _run(TritonAttentionBackend(), *inputs)
        assert bool(fused_calls) == goes_fused
        assert torch.equal(cache, ref_cache)
        tol = 2e-2 if dtype != torch.float32 else 1e-4
        assert (out - ref).norm() / ref.norm() < tol


def test_the_fused_path_over_a_prefix_needs_cudnn_attention(monkeypatch):
    """Chunks over a cached prefix take cuDNN's fused attention only where it runs: cuDNN 9,
    compute capability 8.0 on, 16-bit inputs, head dims a multiple of 8 up to 128 (256 on Hopper)."""
    from pagoda.attention import triton_backend

    monkeypatch.setattr(torch.backends.cudnn, "is_available", lambda: True)
    monkeypatch.setattr(torch.backends.cudnn, "version", lambda: 90100)
    cases = [
        ((9, 0), 128, torch.bfloat16, True), ((9, 0), 256, torch.float16, True), ((8, 0), 128, torch.bfloat16, True),
        ((8, 0), 256, torch.bfloat16, False), ((7, 5), 64, torch.float16, False),
        ((9, 0), 128, torch.float32, False), ((9, 0), 100, torch.bfloat16, False),
    ]
    for capability, head_dim, dtype, expected in cases:
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device, capability=capability: capability)
        triton_backend._has_attention_with_lse.cache_clear()
        assert triton_backend._has_attention_with_lse(torch.device("cuda"), head_dim, dtype) == expected
    monkeypatch.setattr(torch.backends.cudnn, "version", lambda: 8900)
    triton_backend._has_attention_with_lse.cache_clear()
    assert not triton_backend._has_attention_with_lse(torch.device("cuda"), 128, torch.bfloat16)
    triton_backend._has_attention_with_lse.cache_clear()
    assert triton_backend._has_attention_with_lse(torch.device("cpu"), 128, torch.float32)
