"""One CPU engine's decode steps with the C decode attention (pagoda/kernels/cpu_native.py) and with
torch's ops, alternating in one process (this kind of VM drifts by up to 1.5 ms a step between
processes): per-token time of greedy generations after short random prompts. With --pool-dtypes,
the C decode attention alone on the default model's heads instead, for each pool dtype (one
layer's call from Python, best of 300).

    PYTHONPATH=. python3 scripts/bench_cpu_attention.py [--streams 1] [-O 3]
    PYTHONPATH=. python3 scripts/bench_cpu_attention.py --pool-dtypes
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

from pagoda import LLM, SamplingParams


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=1)
    parser.add_argument("--output-len", type=int, default=96)
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("-O", "--optimization-level", type=int, default=2)
    parser.add_argument("--pool-dtypes", action="store_true", help="time the C kernel alone for each pool dtype")
    args = parser.parse_args()
    if args.pool_dtypes:
        return pool_dtypes_table()
    llm = LLM(optimization_level=args.optimization_level, max_model_len=1024)
    params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
    # The engine's attention backend: its decode steps through the C function or torch's ops. (Only
    # the attention: the int4 and Q8_0 matmuls stay as they are.)
    backend = llm.llm_engine.engine_core.engine_core.executor.worker.runner.attention_backend
    if not backend.native_decode:
        raise SystemExit("the C decode attention is not built here (no C compiler): nothing to compare")
    rng = random.Random(0)
    times: dict[str, list[float]] = {"C": [], "torch": []}
    for i in range(args.rounds):
        for mode in ("C", "torch") if i % 2 else ("torch", "C"):
            backend.native_decode = mode == "C"
            prompts = [{"prompt_token_ids": [rng.randrange(100, 40000) for _ in range(12)]} for _ in range(args.streams)]
            started = time.perf_counter()
            llm.generate(prompts, params, use_tqdm=False)
            times[mode].append(1e3 * (time.perf_counter() - started) / args.output_len)
    for mode, values in times.items():
        values = sorted(values[2:])  # the first rounds warm up
        print(f"{args.streams} streams, -O{args.optimization_level}, {mode} attention: "
              f"{statistics.median(values):.2f} ms a token (median), {values[0]:.2f} (min)")


def pool_dtypes_table() -> None:
    import torch

    from pagoda.kernels import cpu_native

    library = cpu_native.load()
    dtypes = [d for d in (torch.float32, torch.float16, torch.bfloat16) if cpu_native.decode_attends(library, d)]
    print("rows x keys | " + " | ".join(f"{str(d).split('.')[-1]} us" for d in dtypes))
    for rows, keys in ((1, 140), (16, 76), (16, 500), (64, 300)):
        print(f"{rows} x {keys} | " + " | ".join(f"{_kernel_us(library, rows, keys, d):.0f}" for d in dtypes))


def _kernel_us(library, rows: int, keys: int, dtype) -> float:
    """One call of the C decode attention, SmolLM2-135M's heads (9 query, 3 KV, 64 wide), blocks of 16."""
    import torch

    from pagoda.kernels import cpu_native

    heads, kv_heads, head_dim, block = 9, 3, 64, 16
    per_row = keys // block + 1
    generator = torch.Generator().manual_seed(0)
    pool = torch.randn(2, rows * per_row, block, kv_heads, head_dim, generator=generator).to(dtype)
    qkv = torch.randn(rows, (heads + 2 * kv_heads) * head_dim, generator=generator)
    q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=1)
    tables = torch.arange(rows * per_row, dtype=torch.int32).view(rows, per_row)
    slots = tables[:, (keys - 1) // block].long() * block + (keys - 1) % block
    args = (q.view(rows, heads, head_dim), k.view(rows, kv_heads, head_dim), v.view(rows, kv_heads, head_dim), pool,
            slots, tables, torch.full((rows,), keys, dtype=torch.int32), head_dim**-0.5)
    best = float("inf")
    for _ in range(300):
        started = time.perf_counter()
        cpu_native.decode_attention(library, *args)
        best = min(best, time.perf_counter() - started)
    return best * 1e6


if __name__ == "__main__":
    main()
