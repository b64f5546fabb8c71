"""Microseconds per 4-bit linear layer on the CPU, per path, at decode (1 row) and small-batch (16
rows) sizes: the torch reference the W4A16 formats ran before (dequantize the whole weight each
call, then matmul) in float32 and bfloat16; torch's CPU int4 kernel (pagoda/quantization/int4pack.py)
with bfloat16 activations (as the layers ran it before Pagoda's own, float32 in and out) and with
float32 ones (its scalar loop); Pagoda's C int4 matmul (pagoda/kernels/cpu_native.py, where the CPU
has AVX512-VNNI or AVX2); and the float32 matmul of the unquantized weight for scale. Shapes: SmolLM2-135M's
gate/up (576 -> 1536) and down (1536 -> 576) projections, and a 4096 x 4096 layer.

With --decode-step: all 120 int4 layers of one of the default model's decode steps (30 x qkv, o,
gate_up, down), their weights far larger than the caches as in the model, through torch's kernel
and the C one alternating, milliseconds per step (median of 30).

    PYTHONPATH=. python scripts/bench_int4_cpu.py [--threads 1] [--rows 1 16] [--decode-step]"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from pagoda.kernels.w4a16_layout import pack_int4, w4a16_gemm_reference
from pagoda.kernels import cpu_native
from pagoda.kernels.w4a16_layout import unpack_int4
from pagoda.quantization.int4pack import Int4Pack, NativeInt4
from pagoda.quantization.w4a16 import PackedW4

# (N, K, group size); SmolLM2's 576 inputs take groups of 64, not 128.
SHAPES = [(1536, 576, 64), (576, 1536, 64), (576, 1536, 128), (4096, 4096, 128)]


def microseconds(fn: Callable[[], object], least_s: float = 0.3) -> float:
    """Mean time of `fn` over at least `least_s` seconds and 3 calls, after one warm-up call."""
    fn()
    calls, start = 0, time.perf_counter()
    while calls < 3 or time.perf_counter() - start < least_s:
        fn()
        calls += 1
    return (time.perf_counter() - start) / calls * 1e6


def layer_paths(n: int, k: int, group_size: int, rows: int) -> dict[str, Callable[[], object]]:
    """Name -> the call to time, for one layer of random 4-bit weights with zero points."""
    g = torch.Generator().manual_seed(0)
    scales = torch.rand(k // group_size, n, generator=g) * 0.02 + 5e-3
    zeros = torch.randint(0, 16, (k // group_size, n), generator=g).float()
    w = PackedW4(pack_int4(torch.randint(0, 16, (k, n), generator=g)), scales, zeros, None, group_size)
    values = (unpack_int4(w.qweight, dim=0).t(), scales.t(), ((8.0 - zeros) * scales).t(), group_size)
    int4 = Int4Pack.from_values(*values)
    fp32_scales_and_zeros = int4.scales_and_zeros.float()
    dense = torch.randn(n, k, generator=g)
    x = torch.randn(rows, k, generator=g)
    xb = x.bfloat16()
    paths = {
        "reference fp32": lambda: w4a16_gemm_reference(x, w.qweight, scales, zeros, None, group_size),
        "reference bf16": lambda: w4a16_gemm_reference(xb, w.qweight, scales.bfloat16(), zeros.bfloat16(), None,
                                                       group_size),
        "int4 bf16": lambda: int4.matmul(x),
        "int4 fp32": lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(x, int4.weight, int4.group_size,
                                                                         fp32_scales_and_zeros),
        "fp32 matmul": lambda: x @ dense.t(),
    }
    if cpu_native.int_matmuls_available():
        native = NativeInt4.from_values(*values)
        paths["int4 C"] = lambda: native.matmul(x)
    return paths


# SmolLM2-135M's int4 layers of one decoder layer (N, K): qkv, o, gate_up, down.
DECODER_LAYER = [(960, 576), (576, 576), (3072, 576), (576, 1536)]


def decode_step_ms(rows: int, repeats: int = 30) -> dict[str, float]:
    """Median milliseconds of the 30 layers' int4 matmuls per kernel, alternating in this process."""
    g = torch.Generator().manual_seed(0)
    shapes = DECODER_LAYER * 30
    kernels: dict[str, list] = {"torch int4": [], "C int4": []}
    for n, k in shapes:
        values = (torch.randint(0, 16, (n, k), generator=g), torch.rand(n, k // 32, generator=g) * 0.02 + 1e-3,
                  torch.rand(n, k // 32, generator=g) * 0.1, 32)
        kernels["torch int4"].append(Int4Pack.from_values(*values))
        kernels["C int4"].append(NativeInt4.from_values(*values))
    inputs = {k: torch.randn(rows, k, generator=g) for _, k in DECODER_LAYER}
    times: dict[str, list[float]] = {name: [] for name in kernels}
    for _ in range(repeats):
        for name, layers in kernels.items():
            start = time.perf_counter()
            for (_, k), layer in zip(shapes, layers):
                layer.matmul(inputs[k])
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--decode-step", action="store_true", help="the default model's 120 layers a step")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.decode_step:
        if not cpu_native.int_matmuls_available():
            raise SystemExit("the C int4 matmul does not run here (it needs a C compiler and AVX512-VNNI or AVX2)")
        for rows in args.rows:
            ms = decode_step_ms(rows)
            print(f"{rows:>3} rows: " + ", ".join(f"{name} {t:.2f} ms" for name, t in ms.items())
                  + f" ({ms['torch int4'] / ms['C int4']:.2f}x)")
        return
    header = None
    for n, k, group_size in SHAPES:
        for rows in args.rows:
            times = {name: microseconds(fn) for name, fn in layer_paths(n, k, group_size, rows).items()}
            if header is None:
                header = list(times)
                print(f"{'K -> N, group':<20} {'rows':>4}  " + "  ".join(f"{name:>14}" for name in header))
            label = f"{k} -> {n}, {group_size}"
            print(f"{label:<20} {rows:>4}  " + "  ".join(f"{times[name]:>14,.0f}" for name in header))


if __name__ == "__main__":
    main()
