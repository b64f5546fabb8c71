"""The CPU decode step with each form of the LM head, alternating in one engine: rounds of decode
steps each way, the median step of each round. This 2-core VM drifts +-30 % minute to minute, so
compare the pairs of a run, not levels across runs. The ways:
- "float32 head": every step reads the float32 weight;
- "screened": greedy steps through its float16 copy (pagoda/layers/lm_head_screen.py), others as above;
- "Q8_0 rows" (a GGUF head kept in Q8_0, as the default model's is: pagoda/layers/q8_rows.py):
  every step through the screen, its candidates from the Q8_0 rows; the float32 ways then hold the
  same values dequantized.

    PYTHONPATH=. python3 scripts/bench_lm_head_screen.py [--streams 1] [-O 2] [--rounds 10] [--temperature 0]"""

from __future__ import annotations

import argparse
import random
from collections.abc import Callable

import torch
from torch import nn

from pagoda.benchmarks.alternating import alternate, print_rounds
from pagoda.config import EngineConfig
from pagoda.engine.llm_engine import LLMEngine
from pagoda.layers.linear import ParallelLMHead
from pagoda.sampling_params import SamplingParams
from pagoda.worker import model_runner


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="default: the embedded default model")
    parser.add_argument("--streams", type=int, default=1)
    parser.add_argument("-O", "--optimization-level", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--steps", type=int, default=15, help="decode steps a round")
    parser.add_argument("--temperature", type=float, default=0.0, help="above 0: sampled steps, never screened")
    args = parser.parse_args()
    engine = LLMEngine(EngineConfig(
        model=args.model, max_model_len=1024, device="cpu", optimization_level=args.optimization_level,
    ))
    params = SamplingParams(temperature=args.temperature, seed=0, max_tokens=100_000, ignore_eos=True)
    rng = random.Random(0)
    for i in range(args.streams):
        engine.add_request(f"s{i}", [rng.randrange(engine.processor.vocab_size) for _ in range(12)], params)
    ways = _ways(engine.engine_core.engine_core.executor.worker.runner.model.lm_head)
    for set_way in ways.values():  # past prefill, each way's screen built
        set_way()
        engine.step()
    medians = alternate(engine.step, ways, args.rounds, args.steps)
    print_rounds(f"decode step, ms (streams {args.streams}, -O{args.optimization_level}, "
                 f"temperature {args.temperature})", medians)


def _ways(head: ParallelLMHead) -> dict[str, Callable[[], None]]:
    """Each way's switch: the head's weight form and whether greedy steps take the screen."""
    screened = model_runner.takes_argmax_only
    q8, empty = head.q8, head.weight
    float32 = head.weight if q8 is None else nn.Parameter(q8[torch.arange(q8.shape[0])], requires_grad=False)

    def way(rows: nn.Module | None, weight: nn.Parameter, takes_argmax_only: Callable[..., bool]) -> Callable[[], None]:
        def switch() -> None:
            head.q8, head.weight = rows, weight
            model_runner.takes_argmax_only = takes_argmax_only
        return switch

    ways = {"float32 head": way(None, float32, lambda p: False), "screened": way(None, float32, screened)}
    if q8 is not None:
        ways["Q8_0 rows"] = way(q8, empty, screened)
    return ways


if __name__ == "__main__":
    main()
