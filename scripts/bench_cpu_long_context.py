"""CPU decode steps of one stream at a long context, its keys and values read in place (one run
of pool blocks: `block_run` in pagoda/attention/torch_backend.py) against gathered, alternating in
one engine: rounds of decode steps each way, the median step of each round. This 2-core VM
drifts +-30 % minute to minute, so compare the pairs of a run.

    PYTHONPATH=. python3 scripts/bench_cpu_long_context.py [--context 3000] [--rounds 8] [--model DIR]"""

from __future__ import annotations

import argparse
import random
from collections.abc import Callable

from pagoda.attention import torch_backend
from pagoda.benchmarks.alternating import alternate, print_rounds
from pagoda.config import EngineConfig
from pagoda.engine.llm_engine import LLMEngine
from pagoda.sampling_params import SamplingParams


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="default: the embedded default model")
    parser.add_argument("--context", type=int, default=3000, help="prompt tokens before the timed decodes")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10, help="decode steps a round")
    args = parser.parse_args()
    engine = LLMEngine(EngineConfig(model=args.model, max_model_len=args.context + 1024, device="cpu"))
    rng = random.Random(0)
    prompt = [rng.randrange(engine.processor.vocab_size) for _ in range(args.context)]
    engine.add_request("long", prompt, SamplingParams(temperature=0, max_tokens=1024, ignore_eos=True))
    while not engine.step():  # the prompt's prefill chunks, until its first token
        pass
    in_place = torch_backend.block_run

    def select(read: Callable[..., slice | None]) -> Callable[[], None]:
        return lambda: setattr(torch_backend, "block_run", read)

    ways = {"gathered": select(lambda table: None), "in place": select(in_place)}
    medians = alternate(engine.step, ways, args.rounds, args.steps)
    torch_backend.block_run = in_place
    print_rounds(f"decode step, ms (one stream, {args.context}-token context)", medians)


if __name__ == "__main__":
    main()
