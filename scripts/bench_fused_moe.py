"""The fused-MoE kernel of one Qwen3-30B-A3B layer on the GPU (128 experts of width 768, top 8,
hidden 2048), by batch size: microseconds of pagoda/kernels/fused_moe.py's fused_experts (the sort
included) under its default tiling and under each candidate tiling, beside the dense matmuls of
the same active parameters (one MLP of width 8 x 768) and the weight bytes read over the measured
copy bandwidth. Each timing is a CUDA graph's replay (do_bench_cudagraph).

    PYTHONPATH=. python3 scripts/bench_fused_moe.py [--tokens 1 16 256 2048]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from ceilings import copy_tb_per_s  # scripts/ceilings.py, beside this script
from triton.testing import do_bench_cudagraph

from pagoda.kernels.fused_moe import TileConfig, default_tile_config, fused_experts
from pagoda.layers.activation import get_act_and_mul

HIDDEN, INTER, EXPERTS, TOP_K = 2048, 768, 128, 8
CANDIDATES = [
    TileConfig(16, 64, 128, 4, 3), TileConfig(16, 128, 128, 4, 3), TileConfig(16, 64, 64, 4, 4),
    TileConfig(32, 64, 128, 4, 3), TileConfig(32, 128, 64, 4, 4), TileConfig(64, 64, 64, 4, 4),
    TileConfig(64, 128, 64, 4, 4), TileConfig(64, 128, 64, 8, 3), TileConfig(128, 128, 64, 8, 3),
    TileConfig(128, 256, 64, 8, 3), TileConfig(64, 256, 64, 8, 4),
]


def microseconds(fn) -> float:
    fn()  # compiles outside the capture
    return do_bench_cudagraph(fn, rep=50) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 64, 256, 1024, 2048, 8192])
    args = parser.parse_args()
    torch.manual_seed(0)
    dtype, device = torch.bfloat16, "cuda"
    w13 = torch.randn(EXPERTS, 2 * INTER, HIDDEN, dtype=dtype, device=device) * 0.02
    w2 = torch.randn(EXPERTS, HIDDEN, INTER, dtype=dtype, device=device) * 0.02
    dense13 = torch.randn(2 * INTER * TOP_K, HIDDEN, dtype=dtype, device=device) * 0.02
    dense2 = torch.randn(HIDDEN, INTER * TOP_K, dtype=dtype, device=device) * 0.02
    bandwidth = copy_tb_per_s() * 1e12
    expert_bytes = 3 * HIDDEN * INTER * dtype.itemsize
    act = get_act_and_mul("silu")  # the fused path's activation too
    print(f"copy bandwidth {bandwidth / 1e12:.2f} TB/s")
    print(f"{'tokens':>6} {'floor':>7} {'dense':>7} {'fused':>7} {'best':>7}  best tiling (m, n, k, warps, stages)")
    for tokens in args.tokens:
        x = torch.randn(tokens, HIDDEN, dtype=dtype, device=device)
        ids = torch.rand(tokens, EXPERTS, device=device).topk(TOP_K, dim=-1).indices
        weights = torch.rand(tokens, TOP_K, device=device)
        experts_read = ids.unique().numel()
        floor = experts_read * expert_bytes / bandwidth * 1e6
        dense = microseconds(lambda: F.linear(act(F.linear(x, dense13)), dense2))
        times = {}
        for config in [default_tile_config(tokens * TOP_K, EXPERTS), *CANDIDATES]:
            if config not in times:
                times[config] = microseconds(lambda: fused_experts(x, w13, w2, weights, ids, "silu", config))
        default = times[default_tile_config(tokens * TOP_K, EXPERTS)]
        best = min(times, key=times.get)
        print(f"{tokens:>6} {floor:>7.1f} {dense:>7.1f} {default:>7.1f} {times[best]:>7.1f}  {tuple(best)}")


if __name__ == "__main__":
    main()
