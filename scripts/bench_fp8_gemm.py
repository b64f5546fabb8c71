"""The Triton FP8 GEMMs (pagoda/kernels/fp8_gemm.py) against torch._scaled_mm (cuBLASLt) on the 8B
model's GEMM shapes (GPU): for each batch M and layer (qkv, o, gate_up, down), the best Triton
kernel and configuration of a sweep, its time, cuBLASLt's, their largest difference, and the time of
what pagoda.quantization.fp8.scaled_mm runs for the shape (the engine's choice). Decode batches
sweep both kernels (the persistent one on Hopper); --prefill, the persistent kernel. Each GEMM
reads its weight from memory, as in the model: the timed calls cycle through copies of it that
together overflow L2 (an H100's 50 MiB would hold o_proj's 16 MiB between calls).

    PYTHONPATH=. python3 scripts/bench_fp8_gemm.py [--m 64 128 256 512] [--no-sweep]
    PYTHONPATH=. python3 scripts/bench_fp8_gemm.py --prefill [--m 512 1024 4096 16384]
"""

from __future__ import annotations

import argparse
import itertools

import torch
from triton.testing import do_bench_cudagraph

from pagoda.kernels.device_info import is_hopper
from pagoda.kernels.fp8_gemm import Fp8GemmConfig, decode_config, fp8_gemm, fp8_gemm_persistent, persistent_config
from pagoda.quantization.fp8 import quantize_fp8_rows, scaled_mm

from bench_linear_methods import SHAPES_8B  # this script's directory is on sys.path


def configs(prefill: bool) -> list[Fp8GemmConfig]:
    if prefill:  # 3 stages of tiles and the stored output tile within the H100's 227 KiB
        grid = itertools.product((128, 256), (128, 256), (64, 128), (4, 8), (3, 4))
        return [Fp8GemmConfig(*c) for c in grid if c[4] * (c[0] + c[1]) * c[2] + 2 * c[0] * c[1] <= 220 * 1024
                and c[0] * c[1] <= 128 * 256]
    grid = itertools.product((64, 128), (64, 128, 256), (128, 256), (4, 8), (3, 4))
    # Shared memory: stages x (BLOCK_M + BLOCK_N) x BLOCK_K bytes, under the H200's 227 KiB.
    return [Fp8GemmConfig(*c) for c in grid if c[4] * (c[0] + c[1]) * c[2] <= 200 * 1024]


def time_us(gemm, weights: list[torch.Tensor]) -> float:
    """Microseconds a call of gemm(weight), in a CUDA graph that calls it on each of `weights` in turn."""
    return do_bench_cudagraph(lambda: [gemm(b) for b in weights], rep=40, return_mode="median") * 1e3 / len(weights)


def best_triton(kernels, a, a_scale, weights, b_scale, prefill: bool) -> tuple[float, str, Fp8GemmConfig]:
    best: tuple[float, str, Fp8GemmConfig | None] = (float("inf"), "", None)
    for (name, gemm), cfg in itertools.product(kernels.items(), configs(prefill)):
        try:
            t = time_us(lambda b: gemm(a, a_scale, b, b_scale, torch.bfloat16, cfg), weights)
        except Exception:  # out of shared memory or registers for this shape: not a candidate
            continue
        best = min(best, (t, name, cfg))
    return best


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--m", type=int, nargs="+", default=None)
    parser.add_argument("--prefill", action="store_true", help="prefill chunks: the persistent kernel's sweep")
    parser.add_argument("--no-sweep", action="store_true", help="cuBLASLt against the engine's choice only")
    args = parser.parse_args()
    kernels = {"persistent": fp8_gemm_persistent} if is_hopper(torch.device("cuda")) else {}
    if not args.prefill:
        kernels["decode"] = fp8_gemm
    torch.manual_seed(0)
    print(f"{'M':>5} {'layer':>8} {'N':>6} {'K':>6} | {'cuBLASLt us':>11} | {'engine us':>9} engine's choice"
          + ("" if args.no_sweep else " | best Triton us, kernel, config, max |diff| from cuBLASLt"))
    default_m = [512, 1024, 2048, 4096, 16384] if args.prefill else [64, 128, 256, 512]
    for m, (name, (n, k)) in itertools.product(args.m or default_m, SHAPES_8B.items()):
        a, a_scale = quantize_fp8_rows(torch.randn(m, k, device="cuda"))
        copies = min(8, -(-300 * 2**20 // (n * k)))
        weights, scales = zip(*(quantize_fp8_rows(torch.randn(n, k, device="cuda")) for _ in range(copies)))
        b_scale = scales[0].reshape(-1)

        def cublas_mm(b):
            return torch._scaled_mm(a, b.t(), scale_a=a_scale, scale_b=b_scale.view(1, -1), out_dtype=torch.bfloat16)

        persistent, decode = persistent_config(a, weights[0], torch.bfloat16), decode_config(m, n, k, a.device)
        choice = (f"persistent {tuple(persistent)}" if persistent is not None else
                  f"decode {tuple(decode)}" if decode is not None else "cuBLASLt")
        engine_us = time_us(lambda b: scaled_mm(a, a_scale, b, b_scale, torch.bfloat16), weights)
        line = f"{m:>5} {name:>8} {n:>6} {k:>6} | {time_us(cublas_mm, weights):>11.1f} | {engine_us:>9.1f} {choice}"
        if not args.no_sweep:
            t, kernel, cfg = best_triton(kernels, a, a_scale, weights, b_scale, args.prefill)
            ours = kernels[kernel](a, a_scale, weights[0], b_scale, torch.bfloat16, cfg)
            line += f" | {t:.1f} {kernel} {tuple(cfg)} {(ours.float() - cublas_mm(weights[0]).float()).abs().max():.3g}"
        print(line, flush=True)


if __name__ == "__main__":
    main()
