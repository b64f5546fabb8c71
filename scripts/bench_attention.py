"""The Triton paged-attention kernel at W1's shapes (Llama-3.1-8B: 32 query heads, 8 KV heads,
head_dim 128, bf16): a decode step of 256 requests and a prefill chunk, for several key-tile widths;
then decodes of few requests, with and without key splits, timed inside a CUDA graph as decode steps
run. Reports time and the KV bytes read per second. Instead, on a 16-bit and an fp8 cache over key
tiles, warps and pipeline stages (the choices of triton_backend._launch_options): --launch-sweep
decode times W1's decode step (256 requests of 512-768 keys; --quick: four choices), --launch-sweep
prefill its prefill step (16 prompts of 512 tokens) over query tiles too.

    PYTHONPATH=. python3 scripts/bench_attention.py [--launch-sweep decode|prefill [--quick]]
"""

from __future__ import annotations

import random
import sys

import torch
from triton.testing import do_bench, do_bench_cudagraph

from pagoda.attention.backend import AttentionMetadata
from pagoda.attention import triton_backend
from pagoda.attention.triton_backend import decode_splits, paged_attention, query_tile
from pagoda.kernels.device_info import num_sms

HEADS, KV_HEADS, HEAD_DIM, BLOCK = 32, 8, 128, 16


def batch(query_lens: list[int], seq_lens: list[int]) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
    dev = "cuda"
    blocks = [-(-s // BLOCK) for s in seq_lens]
    perm = torch.randperm(sum(blocks)).tolist()
    tables, used = [], 0
    for n in blocks:
        tables.append(perm[used : used + n] + [0] * (max(blocks) - n))
        used += n
    starts = [0]
    for n in query_lens:
        starts.append(starts[-1] + n)
    cache = torch.randn(2, sum(blocks), BLOCK, KV_HEADS, HEAD_DIM, device=dev, dtype=torch.bfloat16)
    q = torch.randn(starts[-1], HEADS, HEAD_DIM, device=dev, dtype=torch.bfloat16)
    metadata = AttentionMetadata(
        slot_mapping=torch.zeros(starts[-1], dtype=torch.int64, device=dev),
        query_start_loc=torch.tensor(starts, dtype=torch.int32, device=dev),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=dev),
        block_tables=torch.tensor(tables, dtype=torch.int32, device=dev),
        block_size=BLOCK, query_starts_cpu=starts[:-1], query_lens_cpu=query_lens, seq_lens_cpu=seq_lens,
    )
    return q, cache, metadata


def main() -> None:
    print(f"{'case':<8} {'tile_n':>6} {'ms':>7} {'GB/s':>7}")
    cases = {"decode": ([1] * 256, [640] * 256), "prefill": ([512] * 16, [512] * 16)}
    engine_choice = triton_backend._launch_options
    for name, (query_lens, seq_lens) in cases.items():
        q, cache, metadata = batch(query_lens, seq_lens)
        block_q = query_tile(max(query_lens), HEADS // KV_HEADS)
        kv_bytes = sum(seq_lens) * KV_HEADS * HEAD_DIM * 2 * 2
        for tile_n in (16, 32, 64, 128):
            triton_backend._launch_options = lambda *_: {"tile_n": tile_n}  # Triton's default warps and stages
            ms = do_bench(lambda: paged_attention(q, cache, metadata, HEAD_DIM**-0.5, block_q))
            print(f"{name:<8} {tile_n:>6} {ms:>7.3f} {kv_bytes / ms / 1e6:>7.0f}")
    triton_backend._launch_options = engine_choice  # the split decodes as the engine launches them
    print(f"{'requests':>8} {'keys':>6} {'splits':>6} {'ms':>7} {'GB/s':>7}")
    for num_reqs, keys in ((1, 1024), (1, 8192), (1, 32768), (4, 2048), (4, 32768), (16, 8192), (32, 2048)):
        q, cache, metadata = batch([1] * num_reqs, [keys] * num_reqs)
        kv_bytes = num_reqs * keys * KV_HEADS * HEAD_DIM * 2 * 2
        auto = decode_splits(num_reqs * KV_HEADS, keys, num_sms(q.device))
        for splits in sorted({1, auto}):
            with torch.cuda.stream(torch.cuda.Stream()):  # graphs cannot be captured on the default stream
                ms = do_bench_cudagraph(lambda: paged_attention(q, cache, metadata, HEAD_DIM**-0.5, 4, num_splits=splits))
            print(f"{num_reqs:>8} {keys:>6} {splits:>6} {ms:>7.3f} {kv_bytes / ms / 1e6:>7.0f}")


def launch_sweep(kind: str) -> None:
    """decode: W1's decode step; prefill: its prefill step (16 prompts of 512 tokens), over query
    tiles too (16 or 32 tokens: 64 or 128 rows of the 4-head group)."""
    rng = random.Random(0)
    if kind == "decode":
        seq_lens = [rng.randint(512, 768) for _ in range(256)]
        q, cache, metadata = batch([1] * 256, seq_lens)
        shapes = [(4, tile_n, warps, stages) for tile_n in (64, 128) for warps in (2, 4, 8) for stages in (2, 3, 4)]
        if "--quick" in sys.argv:
            shapes = [(4, 64, warps, stages) for warps in (2, 4) for stages in (2, 3)]
    else:
        seq_lens = [512] * 16
        q, cache, metadata = batch(seq_lens, seq_lens)
        shapes = [
            (block_q, tile_n, warps, stages)
            for block_q in (16, 32) for tile_n in (32, 64, 128) for warps in (4, 8) for stages in (2, 3)
        ]
    print(f"{'cache':<6} {'q_tile':>6} {'tile_n':>6} {'warps':>5} {'stages':>6} {'us':>7} {'TB/s':>6}")
    for name, kv_cache in (("16-bit", cache), ("fp8", cache.to(torch.float8_e4m3fn))):
        kv_bytes = sum(seq_lens) * KV_HEADS * HEAD_DIM * 2 * kv_cache.element_size()
        for block_q, tile_n, warps, stages in shapes:
            triton_backend._launch_options = lambda *_: {"tile_n": tile_n, "num_warps": warps, "num_stages": stages}
            run = lambda: paged_attention(q, kv_cache, metadata, HEAD_DIM**-0.5, block_q)  # noqa: E731
            try:
                with torch.cuda.stream(torch.cuda.Stream()):  # graphs cannot be captured on the default stream
                    ms = do_bench_cudagraph(run)
            except Exception as e:  # a tile too large for shared memory
                print(f"{name:<6} {block_q:>6} {tile_n:>6} {warps:>5} {stages:>6} failed: {type(e).__name__}")
                continue
            print(f"{name:<6} {block_q:>6} {tile_n:>6} {warps:>5} {stages:>6} {ms * 1e3:>7.1f} {kv_bytes / ms / 1e9:>6.2f}")


if __name__ == "__main__":
    if "--launch-sweep" in sys.argv:
        launch_sweep(sys.argv[sys.argv.index("--launch-sweep") + 1])
    else:
        main()
