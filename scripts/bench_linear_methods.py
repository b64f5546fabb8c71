"""Microseconds per decoder layer's four matmuls (qkv, o, gate|up, down) of the 8B shape on a GPU,
per quantized path, at several row counts: bf16 (cuBLAS); fp8 with per-token activation scales
(the Triton quantization kernel + the engine's fp8 GEMM, `scaled_mm`: cuBLASLt's row-wise kernel or,
where fp8_gemm.decode_config picks it, the Triton one; the two alone; and _scaled_mm with one
scale per tensor); W4A16 through tinygemm,
the Triton GEMM, dequantize + cuBLAS, and at one row the GEMV. Each timed inside a CUDA graph (triton's
do_bench_cudagraph), so launch costs do not count: the steps that matter run in graphs too. The
W4A16 thresholds in pagoda/quantization/w4a16.py come from this table.

    PYTHONPATH=. python scripts/bench_linear_methods.py [--rows 1 16 64 256 4096]"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from triton.testing import do_bench_cudagraph

from pagoda.kernels.elementwise import fp8_quantize_rows
from pagoda.kernels.w4a16_gemm import w4_dequantize, w4a16_gemm
from pagoda.kernels.w4a16_gemv import w4a16_gemv
from pagoda.kernels.w4a16_layout import pack_int4
from pagoda.quantization.fp8 import FP8, quantize_fp8_rows, scaled_mm
from pagoda.quantization.w4a16 import PackedW4, to_int4pack

SHAPES_8B = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}


def layer_paths(n: int, k: int):
    """A function of the input x [M, K] giving name -> the call to time, for one linear shape."""
    w = torch.randn(n, k, dtype=torch.bfloat16, device="cuda") * 0.02
    qw, w_scale = quantize_fp8_rows(w)
    packed = PackedW4(
        pack_int4(torch.randint(0, 16, (k, n), device="cuda")),
        torch.rand(k // 128, n, device="cuda", dtype=torch.bfloat16) * 0.01,
        torch.randint(0, 16, (k // 128, n), device="cuda").to(torch.bfloat16), None, 128,
    )
    tiny = to_int4pack(packed)
    w4 = (packed.qweight, packed.scales, packed.zeros, None, 128)
    one = torch.ones((), device="cuda")

    def paths(x: torch.Tensor) -> dict:
        qx, x_scale = fp8_quantize_rows(x, FP8)
        return {
            "bf16": lambda: F.linear(x, w),
            "fp8": lambda: scaled_mm(*fp8_quantize_rows(x, FP8), qw, w_scale, x.dtype),
            "fp8_torch_quant": lambda: scaled_mm(*quantize_fp8_rows(x), qw, w_scale, x.dtype),
            "fp8_quant_only": lambda: fp8_quantize_rows(x, FP8),
            "fp8_mm_only": lambda: scaled_mm(qx, x_scale, qw, w_scale, x.dtype),
            # One scale per tensor on both sides: cuBLASLt's own fp8 kernels rather than the row-wise ones.
            "fp8_mm_tensorwise": lambda: torch._scaled_mm(
                qx, qw.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16
            ),
            "w4_tinygemm": lambda: tiny.matmul(x),
            "w4_triton": lambda: w4a16_gemm(x, *w4),
            "w4_dequant_mm": lambda: x @ w4_dequantize(packed.qweight, packed.scales, packed.zeros, 128),
            "w4_gemv": lambda: w4a16_gemv(x, packed.qweight, packed.scales, packed.zeros, 128),  # one row only
        }

    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 4, 16, 32, 64, 128, 256, 1024, 4096])
    args = parser.parse_args()
    layers = {name: layer_paths(n, k) for name, (n, k) in SHAPES_8B.items()}
    names = None
    for m in args.rows:
        totals: dict[str, float] = {}
        for name, paths in layers.items():
            x = torch.randn(m, SHAPES_8B[name][1], dtype=torch.bfloat16, device="cuda")
            for path, fn in paths(x).items():
                try:
                    totals[path] = totals.get(path, 0.0) + do_bench_cudagraph(fn, rep=40) * 1000
                except Exception as error:  # a path that cannot run this shape: say so and go on
                    print(f"  {path} at {name}, rows {m}: {type(error).__name__}: {str(error)[:100]}")
                    totals[path] = float("nan")
        if names is None:
            names = list(totals)
            print("rows  " + "  ".join(f"{p:>15}" for p in names))
        print(f"{m:>4}  " + "  ".join(f"{totals[p]:>15.1f}" for p in names))


if __name__ == "__main__":
    main()
