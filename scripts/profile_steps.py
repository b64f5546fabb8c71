"""Where a throughput run's time goes, step by step (GPU): prefill vs decode steps, host vs device
time of one step, and the top CUDA kernels of a decode step and a prefill step. With --timeline,
instead, the whole run's kernels are traced and the GPU's idle time between them is reported for
each kind of step (what overlapped scheduling leaves uncovered). --log-compiles names each Triton
kernel that a step compiled, or loaded from Triton's on-disk cache, and how long it took (a run's
first steps meet kernel specializations that start-up did not).

    PYTHONPATH=. python3 scripts/profile_steps.py --model MODEL_DIR [--num-prompts 256 ...]
        [--quantization fp8 --kv-cache-dtype fp8]
    # one long prompt's prefill step (the 4th of 5, each a whole prompt):
    PYTHONPATH=. python3 scripts/profile_steps.py --model MODEL_DIR --num-prompts 5 --input-len 32000 \
        --output-len 1 --max-model-len 32768 --max-num-batched-tokens 32000 --no-enable-prefix-caching
"""

from __future__ import annotations

import argparse
import bisect
import cProfile
import pstats
import random
import time
from collections.abc import Callable

import torch
from torch.profiler import ProfilerActivity, profile

from pagoda.config import EngineConfig
from pagoda.engine.llm_engine import LLMEngine
from pagoda.sampling_params import SamplingParams


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--load-format", default="dummy", help="auto: the checkpoint's weights (a quantized one's)")
    parser.add_argument("--num-prompts", type=int, default=256)
    parser.add_argument("--input-len", type=int, default=512)
    parser.add_argument("--output-len", type=int, default=256)
    parser.add_argument("--max-model-len", type=int, default=1024)
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--quantization", default=None)
    parser.add_argument("--kv-cache-dtype", default="auto")
    parser.add_argument("--max-num-batched-tokens", type=int, default=None)
    parser.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--timeline", action="store_true")
    parser.add_argument("--log-compiles", action="store_true",
                        help="each Triton kernel compiled, or loaded from Triton's cache, within the run: its step "
                        "and time")
    args = parser.parse_args()

    config = EngineConfig(
        model=args.model, load_format=args.load_format, max_model_len=args.max_model_len, skip_tokenizer_init=True,
        enforce_eager=args.enforce_eager, async_scheduling=args.async_scheduling,
        quantization=args.quantization, kv_cache_dtype=args.kv_cache_dtype,
        max_num_batched_tokens=args.max_num_batched_tokens, enable_prefix_caching=args.enable_prefix_caching,
    )
    engine = LLMEngine(config)
    core = engine.engine_core.engine_core  # in this process: its scheduler can be read
    rng = random.Random(0)
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    for i in range(args.num_prompts):
        ids = [rng.randrange(engine.processor.vocab_size) for _ in range(args.input_len)]
        engine.add_request(str(i), ids, params)

    kinds: dict[str, list[float]] = {"prefill": [], "decode": []}
    steps: list[tuple[str, float, float]] = []  # kind, start and end (seconds from the run's start)
    traced: set[str] = set()
    timeline = profile(activities=[ProfilerActivity.CUDA]) if args.timeline else None
    if timeline:
        timeline.start()
    compiles: list[tuple[float, float, str]] = []  # start and end (seconds from the run's start), kernel
    started = time.perf_counter()
    if args.log_compiles:
        _watch_triton_compiles(compiles, started)
    while engine.has_unfinished_requests():
        prefill = any(r.num_computed_tokens < r.num_prompt_tokens for r in core.scheduler.running) or bool(
            core.scheduler.waiting
        )
        kind = "prefill" if prefill else "decode"
        if not timeline and kind not in traced and len(kinds[kind]) >= 3:
            traced.add(kind)
            _trace(engine, kind)
            continue
        t0 = time.perf_counter()
        engine.step()
        if not core.async_scheduling:  # overlapped, a step returns once the one before is read
            torch.cuda.synchronize()
        kinds[kind].append(time.perf_counter() - t0)
        steps.append((kind, t0 - started, time.perf_counter() - started))
    total = time.perf_counter() - started
    if timeline:
        torch.cuda.synchronize()
        timeline.stop()
        _idle_by_kind(timeline, steps)
    if args.log_compiles:
        _report_compiles(compiles, steps)
    print(f"total {total:.2f} s")
    for kind, times in kinds.items():
        if times:
            times_ms = sorted(t * 1e3 for t in times)
            print(f"{kind:>8}: {len(times):4d} steps, {sum(times):6.2f} s, median {times_ms[len(times_ms) // 2]:.2f} ms")


def _idle_by_kind(timeline: profile, steps: list[tuple[str, float, float]]) -> None:
    """The GPU's busy and idle time over the run, idle gaps charged to the kind of the step whose
    host interval they fall in. Overlapped, step N's host interval holds the GPU's work of step
    N - 1, so a gap's kind is approximate at phase changes. The profiler's clock starts near the
    loop's; its first kernel is taken as the run's start."""
    kernels = sorted(
        (e.time_range.start, e.time_range.end, e.name) for e in timeline.events() if e.device_type.name == "CUDA"
    )
    origin = kernels[0][0]
    busy, idle = 0.0, {"prefill": 0.0, "decode": 0.0, "between": 0.0}
    gaps: list[tuple[float, str, str, str]] = []  # milliseconds, where (the step's kind and index), the kernels around
    step_at = _step_finder(steps)
    reach, last = kernels[0][0], kernels[0][2]  # the end of the busy interval so far (kernels may overlap on streams)
    for start, end, name in kernels:
        if start > reach:
            index, kind = step_at((reach - origin) / 1e6)
            idle[kind] += (start - reach) / 1e6
            gaps.append(((start - reach) / 1e3, f"{kind} {index}", last, name))
            busy += (end - start) / 1e6
        else:
            busy += max(0.0, end - reach) / 1e6
        if end >= reach:
            last = name
        reach = max(reach, end)
    gaps.sort(reverse=True)
    print(f"timeline: {len(kernels)} kernels, GPU busy {busy:.2f} s over {(reach - origin) / 1e6:.2f} s; idle "
          + ", ".join(f"{kind} {seconds:.3f} s" for kind, seconds in idle.items())
          + f"; gaps {len(gaps)}, under 50 us {sum(g[0] for g in gaps if g[0] < 0.05) / 1e3:.3f} s; the largest:")
    for ms, where, before, after in gaps[:8]:
        print(f"  {ms:6.1f} ms in {where}, after {before[:50]}, before {after[:50]}")


def _watch_triton_compiles(compiles: list[tuple[float, float, str]], started: float) -> None:
    """Record each kernel specialization that a launch found missing from Triton's in-process
    cache: compiled, or loaded from the on-disk cache (both stall the host mid-step)."""
    from triton import knobs

    pending: dict[object, float] = {}

    def before(*, key: object, fn: object, **_: object) -> bool:
        pending[key] = time.perf_counter() - started
        return False  # compile as usual

    def after(*, key: object, fn: object, **_: object) -> None:
        compiles.append((pending.pop(key, 0.0), time.perf_counter() - started, getattr(fn, "name", str(fn))))

    knobs.runtime.jit_cache_hook = before
    knobs.runtime.jit_post_compile_hook = after


def _report_compiles(compiles: list[tuple[float, float, str]], steps: list[tuple[str, float, float]]) -> None:
    total = sum(end - start for start, end, _ in compiles)
    print(f"Triton kernels compiled or loaded within the run: {len(compiles)}, {total:.3f} s")
    step_at = _step_finder(steps)
    for start, end, name in compiles:
        index, kind = step_at(start)
        print(f"  {name:<40} {(end - start) * 1e3:8.1f} ms in {kind} step {index}")


def _step_finder(steps: list[tuple[str, float, float]]) -> Callable[[float], tuple[int, str]]:
    """at (seconds from the run's start) -> the index of the first step not ended by then, and its
    kind, or "between" where `at` falls outside every step's host interval."""
    ends = [end for _, _, end in steps]

    def step_at(at: float) -> tuple[int, str]:
        index = bisect.bisect_left(ends, at)
        inside = index < len(steps) and steps[index][1] <= at
        return index, steps[index][0] if inside else "between"

    return step_at


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
