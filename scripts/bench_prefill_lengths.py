"""Long-prompt prefill on a GPU (issue 18): the time to the first token of one new prompt at
several lengths, and prefill tokens/s, for Pagoda (one engine, prefix caching off, 32,768-token
steps) and transformers (SDPA; the same random weights' shape, one forward that keeps the last
logits) in the same process. Each length: a warm-up prompt, then the median of --iters new ones.

    PYTHONPATH=. python3 scripts/bench_prefill_lengths.py --model DIR [--lengths 1024 4096 16384 32000 131000]
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections.abc import Callable

import torch

from pagoda import LLM, SamplingParams

STEP_TOKENS = 32768


def median_seconds(run: Callable[[list[int]], None], length: int, iters: int, vocab: int, rng: random.Random) -> float:
    def prompt() -> list[int]:
        return [rng.randrange(vocab) for _ in range(length)]

    run(prompt())  # warm-up: kernels and plans for this length
    times = []
    for _ in range(iters):
        ids = prompt()
        torch.cuda.synchronize()
        start = time.perf_counter()
        run(ids)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384, 32000, 131000])
    parser.add_argument("--iters", type=int, default=3, help="timed prompts per length (one beyond 32,768 tokens)")
    args = parser.parse_args()
    rng = random.Random(0)
    results: dict[str, dict[int, float]] = {}

    llm = LLM(model=args.model, load_format="dummy", max_model_len=max(args.lengths) + 16, skip_tokenizer_init=True,
              max_num_batched_tokens=STEP_TOKENS, enable_prefix_caching=False)
    vocab = llm.llm_engine.processor.vocab_size
    params = SamplingParams(temperature=0.0, max_tokens=1, detokenize=False)

    def pagoda(ids: list[int]) -> None:
        llm.generate([{"prompt_token_ids": ids}], params, use_tqdm=False)

    results["pagoda"] = {n: median_seconds(pagoda, n, _iters(args, n), vocab, rng) for n in args.lengths}
    del llm
    torch.cuda.empty_cache()

    from transformers import AutoModelForCausalLM

    from pagoda.loader.model_loader import load_hf_config
    from pagoda.loader.model_resolver import resolve_model

    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(load_hf_config(resolve_model(args.model, "dummy")),
                                                 dtype=torch.bfloat16, attn_implementation="sdpa").eval()

    @torch.inference_mode()
    def transformers(ids: list[int]) -> None:
        logits = model(torch.tensor([ids], device="cuda"), logits_to_keep=1).logits
        logits.argmax(-1).item()

    results["transformers"] = {n: median_seconds(transformers, n, _iters(args, n), vocab, rng) for n in args.lengths}

    print(f"{'prompt tokens':>13} | " + " | ".join(f"{name} first token ms (prefill tok/s)" for name in results))
    for n in args.lengths:
        print(f"{n:>13} | " + " | ".join(f"{r[n] * 1e3:9.1f} ({n / r[n]:8.0f})" for r in results.values()))


def _iters(args: argparse.Namespace, length: int) -> int:
    return args.iters if length <= STEP_TOKENS else 1


if __name__ == "__main__":
    main()
