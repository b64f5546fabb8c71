"""Where one CPU decode step goes at small batch: each part of the engine's step (scheduler, input
preparation, the model's forward, logits, sampling, the core's update, the output processor and
detokenizer), timed over many steps with their medians, the aten ops one decode step launches,
and the top Python functions by own time.

    PYTHONPATH=. python3 scripts/profile_cpu_step.py [--model DIR] [--streams 1] [--output-len 128]
        [--threads N] [--skip-tokenizer-init --max-model-len 512] [-O 3]

Steps run in this process (the offline engine); the server adds the front end <-> core IPC and
HTTP on top, which `pagoda bench serve` measures end to end. The machine may be shared: compare
shares and op counts, and repeat timings."""

from __future__ import annotations

import argparse
import collections
import cProfile
import pstats
import random
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

from pagoda.config import EngineConfig
from pagoda.core.scheduler import Scheduler
from pagoda.engine.core import EngineCore
from pagoda.engine.llm_engine import LLMEngine
from pagoda.engine.output_processor import OutputProcessor
from pagoda.layers.linear import ParallelLMHead
from pagoda.sample.sampler import PendingSamples, Sampler
from pagoda.sampling_params import SamplingParams
from pagoda.worker.model_runner import ModelRunner

# (label, owner, method): timed on every call, in this order in the report.
_PARTS: list[tuple[str, Any, str]] = [
    ("scheduler.schedule", Scheduler, "schedule"),
    ("runner._prepare (inputs)", ModelRunner, "_prepare"),
    ("runner._forward (model)", ModelRunner, "_forward"),
    ("LM head (logits)", ParallelLMHead, "forward"),
    ("sampler.sample (queue)", Sampler, "sample"),
    ("samples.result (read)", PendingSamples, "result"),
    ("core._read (update)", EngineCore, "_read"),
    ("output processor + detok", OutputProcessor, "process"),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="default: the embedded default model")
    parser.add_argument("--max-model-len", type=int, default=1024)
    parser.add_argument("--skip-tokenizer-init", action="store_true", help="for a model without a tokenizer")
    parser.add_argument("--streams", type=int, default=1)
    parser.add_argument("--input-len", type=int, default=12)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: Pagoda's)")
    parser.add_argument("--rounds", type=int, default=2, help="timed runs after a warm-up run")
    parser.add_argument("-O", "--optimization-level", type=int, default=2, help="3: the decode forward compiled")
    args = parser.parse_args()

    engine = LLMEngine(EngineConfig(
        model=args.model, max_model_len=args.max_model_len, device="cpu", skip_tokenizer_init=args.skip_tokenizer_init,
        optimization_level=args.optimization_level,
    ))
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch threads {torch.get_num_threads()}, streams {args.streams}, output {args.output_len} tokens")
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    rng = random.Random(0)
    vocab = engine.processor.vocab_size

    def run_once(tag: str) -> float:
        for i in range(args.streams):
            engine.add_request(f"{tag}-{i}", [rng.randrange(vocab) for _ in range(args.input_len)], params)
        started = time.perf_counter()
        while engine.has_unfinished_requests():
            engine.step()
        return time.perf_counter() - started

    run_once("warm-up")
    timings = _Timings()
    with timings.installed():
        walls = [run_once(f"round{r}") for r in range(args.rounds)]
    tokens = args.streams * args.output_len
    print("per output token (wall, whole run incl. prefill): "
          + ", ".join(f"{w / args.output_len * 1e3:.2f} ms" for w in walls)
          + f"; {tokens * args.rounds / sum(walls):.1f} tok/s")
    timings.report()
    _count_ops(engine, params, rng, vocab, args.streams, args.input_len)
    _python_profile(engine, params, rng, vocab, args.streams, args.input_len)


class _Timings:
    """Per-call durations of the parts in _PARTS, wrapped in place while installed."""

    def __init__(self) -> None:
        self.calls: dict[str, list[float]] = collections.defaultdict(list)
        self.steps: list[float] = []

    def installed(self) -> _Installed:
        return _Installed(self)

    def wrap(self, label: str, fn: Callable) -> Callable:
        def timed(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.calls[label].append(time.perf_counter() - t0)
        return timed

    def report(self) -> None:
        steps = self.calls["engine.step (all)"]
        median_step = statistics.median(steps)
        print(f"\n{'part':<28}{'calls':>7}{'median ms':>11}{'total s':>9}{'share':>7}")
        for label in [p[0] for p in _PARTS] + ["engine.step (all)"]:
            times = self.calls.get(label, [])
            if times:
                share = sum(times) / sum(steps)
                print(f"{label:<28}{len(times):>7}{statistics.median(times) * 1e3:>11.3f}{sum(times):>9.3f}"
                      f"{share:>7.1%}")
        print(f"median step {median_step * 1e3:.2f} ms; the rest is the core's own loop and Python glue")


class _Installed:
    def __init__(self, timings: _Timings) -> None:
        self.timings = timings
        self.saved: list[tuple[Any, str, Callable]] = []

    def __enter__(self) -> None:
        for label, owner, name in _PARTS + [("engine.step (all)", LLMEngine, "step")]:
            fn = getattr(owner, name)
            self.saved.append((owner, name, fn))
            setattr(owner, name, self.timings.wrap(label, fn))

    def __exit__(self, *exc: object) -> None:
        for owner, name, fn in reversed(self.saved):
            setattr(owner, name, fn)


def _start(engine: LLMEngine, params: SamplingParams, rng: random.Random, vocab: int, streams: int,
           input_len: int, tag: str) -> None:
    """Requests in their decode phase: added, then stepped past prefill."""
    for i in range(streams):
        engine.add_request(f"{tag}-{i}", [rng.randrange(vocab) for _ in range(input_len)], params)
    for _ in range(4):
        engine.step()


def _finish(engine: LLMEngine) -> None:
    while engine.has_unfinished_requests():
        engine.step()


def _count_ops(engine: LLMEngine, params: SamplingParams, rng: random.Random, vocab: int, streams: int,
               input_len: int) -> None:
    """The aten ops (and their CPU time) of one decode step, and how many there are."""
    _start(engine, params, rng, vocab, streams, input_len, "ops")
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        engine.step()
    _finish(engine)
    events = prof.key_averages()
    aten = [e for e in events if e.key.startswith("aten::")]
    print(f"\none decode step: {sum(e.count for e in aten)} aten op calls "
          f"({len(aten)} kinds), top by self CPU time:")
    print(events.table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=45))


def _python_profile(engine: LLMEngine, params: SamplingParams, rng: random.Random, vocab: int, streams: int,
                    input_len: int) -> None:
    """Python functions by own time over 40 decode steps."""
    _start(engine, params, rng, vocab, streams, input_len, "py")
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(40):
        engine.step()
    profiler.disable()
    _finish(engine)
    print("40 decode steps, Python functions by own time:")
    pstats.Stats(profiler).sort_stats("tottime").print_stats(20)


if __name__ == "__main__":
    main()
