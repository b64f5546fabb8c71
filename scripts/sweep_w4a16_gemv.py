"""The W4A16 GEMV's launch choices per layer shape on a GPU: microseconds a layer for tinygemm, for
the engine's own launch (pagoda/kernels/w4a16_gemv.py `launch`) and for each tile (columns x packed
rows x warps) and number of K slices. One bfloat16 row, groups of 128, and 8 layers' distinct
weights in each CUDA graph (triton's do_bench_cudagraph), so that they come from DRAM as a decode
step's do. The launch rule in w4a16_gemv.py comes from this table.

    PYTHONPATH=. python scripts/sweep_w4a16_gemv.py [--model CONFIG_DIR] [--shapes qkv o down]

The layer shapes are the 8B's unless --model names a directory with a config.json."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
import triton
from triton.testing import do_bench_cudagraph

from pagoda.kernels.device_info import k_slices
from pagoda.kernels.w4a16_gemv import Tile, gemv_at, w4a16_gemv
from pagoda.kernels.w4a16_layout import pack_int4
from pagoda.quantization.w4a16 import PackedW4, to_int4pack

LAYERS = ("qkv", "o", "gate_up", "down")
LLAMA_8B = {"hidden_size": 4096, "num_attention_heads": 32, "num_key_value_heads": 8, "intermediate_size": 14336}
COPIES = 8
TILES = [Tile(columns, words, warps) for columns in (16, 32, 64)
         for words, warps in ((32, 2), (64, 4), (128, 4), (128, 8), (256, 8))]
SPLITS = (1, 2, 4, 8, 16)


def launch_tile(x: torch.Tensor, w: PackedW4, tile: Tile, splits: int,
                workspace: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """The GEMV's kernel at this tile and (at most) this many slices of whole tiles along K."""
    words_per_split, split = k_slices(w.qweight.shape[0], splits, tile.words)
    return gemv_at(x, w.qweight, w.scales, w.zeros, w.group_size, tile, words_per_split, split, workspace)


def layer_shapes(config: dict) -> dict[str, tuple[int, int]]:
    """(N, K) of a decoder layer's four projections, from a Llama-style config."""
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    kv_heads = config.get("num_key_value_heads") or heads
    ffn = config["intermediate_size"]
    return {"qkv": ((heads + 2 * kv_heads) * head_dim, hidden), "o": (hidden, heads * head_dim),
            "gate_up": (2 * ffn, hidden), "down": (hidden, ffn)}


def layer_times(n: int, k: int) -> dict[str, float]:
    """us a layer of each way, the tiles' results first checked against the engine's launch."""
    weights = [PackedW4(pack_int4(torch.randint(0, 16, (k, n), device="cuda")),
                        torch.rand(k // 128, n, device="cuda", dtype=torch.bfloat16) * 0.01,
                        torch.randint(0, 16, (k // 128, n), device="cuda").to(torch.bfloat16), None, 128)
               for _ in range(COPIES)]
    int4 = [to_int4pack(w) for w in weights]
    x = torch.randn(1, k, dtype=torch.bfloat16, device="cuda")
    workspace = (torch.empty(max(SPLITS) * n, dtype=torch.float32, device="cuda"),
                 torch.zeros(triton.cdiv(n, min(tile.columns for tile in TILES)), dtype=torch.int32, device="cuda"))

    def per_layer(fn) -> float:
        return do_bench_cudagraph(fn, rep=40) * 1000 / COPIES

    engine = w4a16_gemv(x, weights[0].qweight, weights[0].scales, weights[0].zeros, 128).float()  # eager first
    times = {"tinygemm": per_layer(lambda: [t.matmul(x) for t in int4]),
             "engine": per_layer(lambda: [w4a16_gemv(x, w.qweight, w.scales, w.zeros, 128) for w in weights])}
    for tile in TILES:
        for splits in SPLITS:
            if splits > 1 and n >= 16384:  # a wide layer's column blocks fill the SMs
                continue
            got = launch_tile(x, weights[0], tile, splits, workspace).float()
            torch.testing.assert_close(got, engine, rtol=0, atol=1e-2 * engine.abs().max().item())
            times["{}x{}x{} /{}".format(*tile, splits)] = per_layer(
                lambda: [launch_tile(x, w, tile, splits, workspace) for w in weights])
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="a directory with the config.json whose layers to sweep")
    parser.add_argument("--shapes", nargs="+", choices=LAYERS, default=list(LAYERS))
    parser.add_argument("--top", type=int, default=8, help="the fastest ways printed a shape")
    args = parser.parse_args()
    assert os.environ.get("TRITON_INTERPRET") != "1", "a timing sweep: run it on a GPU"
    config = json.loads((args.model / "config.json").read_text()) if args.model else LLAMA_8B
    shapes = layer_shapes(config)
    for name in args.shapes:
        n, k = shapes[name]
        times = layer_times(n, k)
        megabytes = (n * k // 2 + 2 * 2 * n * k // 128) / 1e6  # 4-bit weights, bf16 scales and zero points
        print(f"{name} ({n} x {k}, {megabytes:.1f} MB): tinygemm {times['tinygemm']:.1f} us, "
              f"the engine's launch {times['engine']:.1f} us")
        for way, us in sorted(times.items(), key=lambda item: item[1])[:args.top]:
            print(f"  {way:16s} {us:6.1f} us  {megabytes / us:5.2f} TB/s")


if __name__ == "__main__":
    main()
