"""Speculative decoding with `ngram` (prompt lookup) against none, single stream, in one run: the
default model (or --model) asked to repeat a paragraph (--task edit: with one word changed),
greedy; prints output tokens/s of each and the mean acceptance length (tokens a verifying step
gave the request: 1 + accepted / drafts).

    PYTHONPATH=. python scripts/bench_ngram.py [--model PATH] [--task repeat|edit] [--k 4] [--repeats 3]
"""

from __future__ import annotations

import argparse
import time

from pagoda import LLM, SamplingParams

PARAGRAPH = (
    "The lighthouse keeper climbed the spiral stairs every evening at dusk, carrying a can of oil and a "
    "cloth for the lens. From the gallery he could see the fishing boats returning to the harbour, their "
    "lanterns swaying over the dark water, and the gulls settling on the breakwater for the night. He "
    "wrote the weather in a leather book: the wind, the swell, the colour of the sky, and the names of "
    "the boats that came home."
)
TASKS = {
    "repeat": "Repeat this paragraph exactly:",
    "edit": 'Repeat this paragraph with one word changed: "evening" becomes "morning".',
}


def run(llm: LLM, prompt: str, max_tokens: int, repeats: int) -> tuple[float, list[int]]:
    """The best output tokens/s of `repeats` runs, and the tokens of one."""
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    best, tokens = 0.0, []
    for _ in range(repeats):
        started = time.perf_counter()
        out = llm.chat([{"role": "user", "content": prompt}], params, use_tqdm=False)[0]
        tokens = list(out.outputs[0].token_ids)
        best = max(best, len(tokens) / (time.perf_counter() - started))
    return best, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="the model (default: the embedded one)")
    parser.add_argument("--k", type=int, default=4, help="num_speculative_tokens")
    parser.add_argument("--prompt-lookup-max", type=int, default=4, help="the longest n-gram matched")
    parser.add_argument("--max-tokens", type=int, default=160, help="output tokens at most")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each; the best is reported")
    parser.add_argument("--task", choices=sorted(TASKS), default="repeat",
                        help="repeat the paragraph exactly, or with one word changed (edit)")
    args = parser.parse_args()
    prompt = f"{TASKS[args.task]}\n\n{PARAGRAPH}"
    plain = LLM(args.model)
    plain_rate, plain_tokens = run(plain, prompt, args.max_tokens, args.repeats)
    plain.shutdown()
    spec = {"method": "ngram", "num_speculative_tokens": args.k, "prompt_lookup_min": 1,
            "prompt_lookup_max": args.prompt_lookup_max}
    llm = LLM(args.model, speculative_config=spec)
    rate, tokens = run(llm, prompt, args.max_tokens, args.repeats)
    stats = llm.llm_engine.engine_core.engine_core.scheduler.stats()
    print(f"no speculation: {plain_rate:.1f} output tok/s ({len(plain_tokens)} tokens)")
    same = "same tokens" if tokens == plain_tokens else "DIFFERENT tokens"
    print(f"ngram k={args.k}: {rate:.1f} output tok/s ({len(tokens)} tokens, {same}), {rate / plain_rate:.2f}x; "
          f"mean acceptance "
          f"length {1 + stats.num_accepted_tokens / max(stats.num_drafts, 1):.2f} "
          f"({stats.num_accepted_tokens}/{stats.num_draft_tokens} drafts accepted)")


if __name__ == "__main__":
    main()
