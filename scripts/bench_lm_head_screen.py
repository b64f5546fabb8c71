"""The CPU decode step with the LM head screened through its float16 copy (greedy steps,
pagoda/layers/lm_head_screen.py) against the float32 head, alternating in one engine: rounds of
decode steps each way, the median step of each round. This 2-core VM drifts +-30 % minute to
minute, so compare the pairs of a run, not levels across runs.

    PYTHONPATH=. python3 scripts/bench_lm_head_screen.py [--streams 1] [-O 2] [--rounds 10]"""

from __future__ import annotations

import argparse
import random
import statistics
import time

from pagoda.config import EngineConfig
from pagoda.engine.llm_engine import LLMEngine
from pagoda.sampling_params import SamplingParams
from pagoda.worker import model_runner


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="default: the embedded default model")
    parser.add_argument("--streams", type=int, default=1)
    parser.add_argument("-O", "--optimization-level", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--steps", type=int, default=15, help="decode steps a round")
    args = parser.parse_args()
    engine = LLMEngine(EngineConfig(
        model=args.model, max_model_len=1024, device="cpu", optimization_level=args.optimization_level,
    ))
    params = SamplingParams(temperature=0.0, max_tokens=100_000, ignore_eos=True)
    rng = random.Random(0)
    for i in range(args.streams):
        engine.add_request(f"s{i}", [rng.randrange(engine.processor.vocab_size) for _ in range(12)], params)
    for _ in range(5):  # past prefill, the screen built
        engine.step()
    screened = model_runner.takes_argmax_only
    ways = {"float32 head": lambda p: False, "screened": screened}
    medians: dict[str, list[float]] = {name: [] for name in ways}
    for r in range(args.rounds):
        for name in (list(ways) if r % 2 == 0 else list(reversed(ways))):
            model_runner.takes_argmax_only = ways[name]
            engine.step()
            steps = []
            for _ in range(args.steps):
                started = time.perf_counter()
                engine.step()
                steps.append(time.perf_counter() - started)
            medians[name].append(statistics.median(steps) * 1e3)
    model_runner.takes_argmax_only = screened
    print(f"decode step, ms (streams {args.streams}, -O{args.optimization_level}): median of each round")
    for name, values in medians.items():
        print(f"{name:<14} median {statistics.median(values):6.2f}   " + " ".join(f"{v:.1f}" for v in values))


if __name__ == "__main__":
    main()
