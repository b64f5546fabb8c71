"""Where a throughput run's time goes, step by step (GPU): prefill vs decode steps, host vs device
time of one step, and the top CUDA kernels of a decode step and a prefill step.

    PYTHONPATH=. python3 scripts/profile_steps.py --model MODEL_DIR [--num-prompts 256 ...]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import random
import time

import torch
from torch.profiler import ProfilerActivity, profile

from pagoda.config import EngineConfig
from pagoda.engine.llm_engine import LLMEngine
from pagoda.sampling_params import SamplingParams


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--num-prompts", type=int, default=256)
    parser.add_argument("--input-len", type=int, default=512)
    parser.add_argument("--output-len", type=int, default=256)
    parser.add_argument("--max-model-len", type=int, default=1024)
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=None)
    args = parser.parse_args()

    config = EngineConfig(
        model=args.model, load_format="dummy", max_model_len=args.max_model_len, skip_tokenizer_init=True,
        enforce_eager=args.enforce_eager, async_scheduling=args.async_scheduling,
    )
    engine = LLMEngine(config)
    core = engine.engine_core.engine_core  # in this process: its scheduler can be read
    rng = random.Random(0)
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    for i in range(args.num_prompts):
        ids = [rng.randrange(engine.processor.vocab_size) for _ in range(args.input_len)]
        engine.add_request(str(i), ids, params)

    kinds: dict[str, list[float]] = {"prefill": [], "decode": []}
    traced: set[str] = set()
    started = time.perf_counter()
    while engine.has_unfinished_requests():
        prefill = any(r.num_computed_tokens < r.num_prompt_tokens for r in core.scheduler.running) or bool(
            core.scheduler.waiting
        )
        kind = "prefill" if prefill else "decode"
        if kind not in traced and len(kinds[kind]) >= 3:
            traced.add(kind)
            _trace(engine, kind)
            continue
        t0 = time.perf_counter()
        engine.step()
        if not core.async_scheduling:  # overlapped, a step returns once the one before is read
            torch.cuda.synchronize()
        kinds[kind].append(time.perf_counter() - t0)
    total = time.perf_counter() - started
    print(f"total {total:.2f} s")
    for kind, times in kinds.items():
        if times:
            times_ms = sorted(t * 1e3 for t in times)
            print(f"{kind:>8}: {len(times):4d} steps, {sum(times):6.2f} s, median {times_ms[len(times_ms) // 2]:.2f} ms")


def _trace(engine: LLMEngine, kind: str) -> None:
    if kind == "decode":  # the host side: Python functions over 20 decode steps
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(20):
            engine.step()
        profiler.disable()
        pstats.Stats(profiler).sort_stats("tottime").print_stats(18)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        engine.step()
        host = time.perf_counter() - t0
        torch.cuda.synchronize()
    print(f"--- one {kind} step: host {host * 1e3:.2f} ms (profiled)")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=60))


if __name__ == "__main__":
    main()
