"""One CPU engine's decode steps with the C decode attention (pagoda/kernels/cpu_native.py) and with
torch's ops, alternating in one process (this kind of VM drifts by up to 1.5 ms a step between
processes): per-token time of greedy generations after short random prompts.

    PYTHONPATH=. python3 scripts/bench_cpu_attention.py [--streams 1] [-O 3]
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
    args = parser.parse_args()
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


if __name__ == "__main__":
    main()
