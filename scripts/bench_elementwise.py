"""The elementwise work of a decoder layer on the GPU: torch eager vs torch.compile vs the Triton
kernels of pagoda/kernels/elementwise.py, at Llama-3.1-8B shapes (decode batch and prefill chunk).
--fp8 instead times the norm and SiLU-and-mul writing an fp8 GEMM's input (fused) against each
followed by the quantization kernel, inside CUDA graphs as decode steps run them, for each count of
warps a whole-row program may take.

    PYTHONPATH=. python3 scripts/bench_elementwise.py [--fp8]
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from triton.testing import do_bench, do_bench_cudagraph

from pagoda.kernels import elementwise
from pagoda.kernels.elementwise import fp8_quantize_rows, rms_norm, rotary_inplace, silu_and_mul

HIDDEN, INTER, HEADS, KV_HEADS, HEAD_DIM, EPS = 4096, 14336, 32, 8, 128, 1e-5


def add_rms_norm(x, residual, weight):
    x = x + residual
    xf = x.float()
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + EPS)).to(x.dtype), x


def rotate(positions, q, k, cos_sin):
    cos, sin = cos_sin[positions].unsqueeze(1).chunk(2, dim=-1)

    def one(x):
        x1, x2 = x.float().chunk(2, dim=-1)
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)

    return one(q), one(k)


def silu_mul(x):
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def main() -> None:
    dev, dt = "cuda", torch.bfloat16
    print(f"{'op':<10} {'tokens':>6} {'eager us':>9} {'compile us':>10} {'triton us':>9}")
    for tokens in (256, 8192):
        x = torch.randn(tokens, HIDDEN, device=dev, dtype=dt)
        res = torch.randn_like(x)
        w = torch.rand(HIDDEN, device=dev, dtype=dt)
        qkv = torch.randn(tokens, (HEADS + 2 * KV_HEADS) * HEAD_DIM, device=dev, dtype=dt)
        q = qkv[:, : HEADS * HEAD_DIM].view(tokens, HEADS, HEAD_DIM)
        k = qkv[:, HEADS * HEAD_DIM : (HEADS + KV_HEADS) * HEAD_DIM].view(tokens, KV_HEADS, HEAD_DIM)
        cos_sin = torch.randn(2048, HEAD_DIM, device=dev)
        pos = torch.randint(0, 2048, (tokens,), device=dev)
        gu = torch.randn(tokens, 2 * INTER, device=dev, dtype=dt)
        cases = {
            "rmsnorm": (lambda f: (lambda: f(x, res.clone(), w)), add_rms_norm,
                        lambda: rms_norm(x, w, EPS, res.clone())),
            "rotary": (lambda f: (lambda: f(pos, q, k, cos_sin)), rotate,
                       lambda: rotary_inplace(pos, q, k, cos_sin)),
            "silu_mul": (lambda f: (lambda: f(gu)), silu_mul, lambda: silu_and_mul(gu)),
        }
        for name, (call, ref, triton_fn) in cases.items():
            eager = do_bench(call(ref))
            compiled = do_bench(call(torch.compile(ref, dynamic=False)))
            print(f"{name:<10} {tokens:>6} {eager * 1e3:>9.1f} {compiled * 1e3:>10.1f} {do_bench(triton_fn) * 1e3:>9.1f}")


def fp8_fused() -> None:
    dev, dt, fp8 = "cuda", torch.bfloat16, torch.float8_e4m3fn
    print(f"{'op':<10} {'tokens':>6} {'warps':>5} {'unfused us':>10} {'fused us':>8}")
    for tokens in (256, 8192):
        x = torch.randn(tokens, HIDDEN, device=dev, dtype=dt)
        res = torch.randn_like(x)
        w = torch.rand(HIDDEN, device=dev, dtype=dt)
        gu = torch.randn(tokens, 2 * INTER, device=dev, dtype=dt)
        cases = {
            "rmsnorm": (lambda: fp8_quantize_rows(rms_norm(x, w, EPS, res), fp8),
                        lambda: rms_norm(x, w, EPS, res, fp8_out=(fp8, None))),
            "silu_mul": (lambda: fp8_quantize_rows(silu_and_mul(gu), fp8), lambda: silu_and_mul(gu, (fp8, None))),
        }
        for warps in (4, 8, 16):
            elementwise._row_warps = lambda block: warps if block >= 8192 else 4
            for name, (unfused, fused) in cases.items():
                with torch.cuda.stream(torch.cuda.Stream()):  # graphs cannot be captured on the default stream
                    times = [do_bench_cudagraph(f) * 1e3 for f in (unfused, fused)]
                print(f"{name:<10} {tokens:>6} {warps:>5} {times[0]:>10.1f} {times[1]:>8.1f}")


if __name__ == "__main__":
    fp8_fused() if "--fp8" in sys.argv else main()
