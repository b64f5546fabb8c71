"""The CPU sampler's time a step at 16 streams of the default model (or --model): 16 chat requests
of 64 tokens at once, greedy, temperature 0.8 with top-p 0.95, and temperature 1 (the OpenAI
default), each setting's whole run and the sampler's median per step. Compare trees by running
it with PYTHONPATH=TREE in turn (the 2-core VM drifts: alternate and repeat).

    PYTHONPATH=. python3 scripts/bench_cpu_sampling.py [--model DIR] [--max-tokens 64]"""

from __future__ import annotations

import argparse
import statistics
import time

from pagoda import LLM, SamplingParams
from pagoda.sample.sampler import Sampler

TOPICS = ["the sea", "a cat", "Paris", "gravity", "music", "a robot", "the moon", "coffee", "winter", "a forest",
          "trains", "chess", "bread", "rain", "a library", "mountains"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="default: the embedded default model")
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()
    llm = LLM(model=args.model, max_model_len=1024, device="cpu")
    chats = [[{"role": "user", "content": f"Write a short story about {topic}."}] for topic in TOPICS]
    times: list[float] = []
    sample = Sampler.sample

    def timed(self: Sampler, *args: object, **kwargs: object) -> object:
        started = time.perf_counter()
        result = sample(self, *args, **kwargs)
        times.append(time.perf_counter() - started)
        return result

    Sampler.sample = timed  # type: ignore[method-assign]
    for temperature, top_p in ((0.0, 1.0), (0.8, 0.95), (1.0, 1.0)):
        times.clear()
        started = time.perf_counter()
        params = SamplingParams(temperature=temperature, top_p=top_p, max_tokens=args.max_tokens, ignore_eos=True)
        llm.chat(chats, params, use_tqdm=False)
        print(f"temperature {temperature}, top_p {top_p}: {time.perf_counter() - started:.2f} s, "
              f"sampler median {statistics.median(times) * 1e3:.2f} ms a step")


if __name__ == "__main__":
    main()
