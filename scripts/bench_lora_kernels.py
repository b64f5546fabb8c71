"""The LoRA work of one decoder layer on the GPU: microseconds of the four LoRA'd matmuls of
Llama-3.1-8B (qkv, o, gate-up, down; the fused ones with a rank-R part each) over 8 adapters
round-robin, the base matmuls beside them for scale; the kernels of pagoda/kernels/lora.py, and
optionally an older release of that module (its add_lora_triton taking the slot indices, as the
per-token kernels did). Each timing is a CUDA graph's replay (do_bench_cudagraph).

    git show 8fdfd6e:pagoda/kernels/lora.py > old_lora_kernels.py   # the per-token (BGMV) kernels
    PYTHONPATH=. python3 scripts/bench_lora_kernels.py --old old_lora_kernels.py
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
from types import ModuleType

import torch
from triton.testing import do_bench_cudagraph

from pagoda.kernels.lora import add_lora_triton, group_tokens

HIDDEN, INTER, Q, KV = 4096, 14336, 4096, 1024
# name: (in, out, parts of the fused layer)
LAYERS = {"qkv_proj": (HIDDEN, Q + 2 * KV, 3), "o_proj": (Q, HIDDEN, 1), "gate_up_proj": (HIDDEN, 2 * INTER, 2),
          "down_proj": (INTER, HIDDEN, 1)}


def load_module(path: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location("old_lora_kernels", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def microseconds(fn) -> float:
    fn()  # compiles outside the capture
    return do_bench_cudagraph(fn, rep=50) * 1e3


def layer_times(old: ModuleType | None, indices: torch.Tensor, slots: int, k: int, n: int, rank: int) -> list[float]:
    """Microseconds of the base matmul, the old kernels (nan without) and the new ones."""
    tokens, dev, dt = indices.shape[0], indices.device, torch.bfloat16
    groups = group_tokens(indices, slots)
    x = torch.randn(tokens, k, device=dev, dtype=dt)
    weight = torch.randn(n, k, device=dev, dtype=dt) * 0.01
    out = x @ weight.T
    lora_a = torch.randn(slots, rank, k, device=dev, dtype=dt) * 0.01
    lora_b = torch.randn(slots, n, rank, device=dev, dtype=dt) * 0.01
    return [
        microseconds(lambda: torch.matmul(x, weight.T, out=out)),
        microseconds(lambda: old.add_lora_triton(out, x, lora_a, lora_b, indices)) if old else float("nan"),
        microseconds(lambda: add_lora_triton(out, x, lora_a, lora_b, groups)),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--old", help="an older pagoda/kernels/lora.py whose add_lora_triton takes the indices")
    parser.add_argument("--tokens", type=int, nargs="+", default=[256, 1, 2048])
    parser.add_argument("--num-loras", type=int, default=8)
    parser.add_argument("--rank", type=int, default=16)
    args = parser.parse_args()
    old = load_module(args.old) if args.old else None
    slots = args.num_loras
    print(f"{slots} adapters of rank {args.rank} round-robin; microseconds per call")
    print(f"{'tokens':>6} {'layer':<13} {'base':>8} {'old':>8} {'new':>8} {'new/base':>9}")
    for tokens in args.tokens:
        indices = torch.arange(tokens, device="cuda", dtype=torch.int32) % slots
        totals = [0.0, 0.0, 0.0]
        for name, (k, n, parts) in LAYERS.items():
            times = layer_times(old, indices, slots, k, n, parts * args.rank)
            totals = [t + u for t, u in zip(totals, times)]
            print(f"{tokens:>6} {name:<13} {times[0]:>8.1f} {times[1]:>8.1f} {times[2]:>8.1f} {times[2] / times[0]:>9.2f}")
        print(f"{tokens:>6} {'all four':<13} {totals[0]:>8.1f} {totals[1]:>8.1f} {totals[2]:>8.1f} "
              f"{totals[2] / totals[0]:>9.2f}")
        grouping = microseconds(functools.partial(group_tokens, indices, slots))
        print(f"{tokens:>6} {'grouping':<13} {'':>8} {'':>8} {grouping:>8.1f}   (once per forward pass)")


if __name__ == "__main__":
    main()
