"""The two ceilings of this GPU, measured as ../shared/BENCHMARKS.md defines them, for quoting
benchmark figures as fractions of the floor in the same call: a bf16 8192^3 matrix product
(TFLOP/s) and a large device-to-device copy (TB/s, bytes read + written). Medians of timed runs."""

from __future__ import annotations

import json
import sys

import torch
from triton.testing import do_bench


def copy_tb_per_s() -> float:
    """A 1 GiB device-to-device copy, bytes read + written per second, in TB/s (other scripts
    quote their floors against this same measure)."""
    src = torch.randn(2**30 // 2, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    copy_ms = do_bench(lambda: dst.copy_(src), warmup=100, rep=500, return_mode="median")
    return 2 * src.numel() * src.element_size() / copy_ms / 1e9


def main() -> None:
    n = 8192
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    matmul_ms = do_bench(lambda: a @ b, warmup=100, rep=500, return_mode="median")
    result = {"matmul_tflops": 2 * n**3 / matmul_ms / 1e9, "copy_tb_per_s": copy_tb_per_s()}
    print(f"ceilings: bf16 matmul {result['matmul_tflops']:.0f} TFLOP/s, copy {result['copy_tb_per_s']:.2f} TB/s")
    if len(sys.argv) > 1:
        with open(sys.argv[1], "w") as f:
            json.dump(result, f)


if __name__ == "__main__":
    main()
