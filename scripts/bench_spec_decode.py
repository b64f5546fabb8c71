"""Speculative decoding's engine side at a controlled acceptance rate (issue 19, "Measure (b)"):
end-to-end output tokens/s with and without speculation, greedy, at several batch sizes, in one
run. The drafts replay each request's own greedy continuation (from the run without
speculation) with each token corrupted with probability 1 - alpha (pagoda/benchmarks/
replay_proposer.py), so acceptance is controlled even with random weights. Prints, per batch
size and alpha: tokens/s of each, the speedup, and the mean acceptance length (tokens a
verifying step gave a request: 1 + accepted / drafts; expected 1 + alpha + ... + alpha^k).

    PYTHONPATH=. python scripts/bench_spec_decode.py --model shared/models/llama-3.1-8b \\
        --alpha 0.5 0.7 0.9 -k 4 --batch 1 8 64 [--draft-model shared/models/llama-3.2-1b]

With --draft-model, the engine also runs that draft (method draft_model) every step for its cost
while the replay still decides the drafts, and prints the draft's time per engine step.
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import time
from collections.abc import Sequence

from pagoda import SamplingParams
from pagoda.benchmarks.replay_proposer import ReplayProposer
from pagoda.config import EngineConfig
from pagoda.core.request import Request
from pagoda.engine.llm_engine import LLMEngine
from pagoda.spec.proposer import TokenProposer


def generate(engine: LLMEngine, prompts: dict[str, list[int]], output_len: int) -> tuple[dict[str, list[int]], float]:
    """Every request's greedy output, and the output tokens/s of the whole batch."""
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True, detokenize=False)
    started = time.perf_counter()
    for rid, prompt in prompts.items():
        engine.add_request(rid, prompt, params, final_only=True)
    outputs: dict[str, list[int]] = {}
    while engine.has_unfinished_requests():
        outputs.update((out.request_id, list(out.outputs[0].token_ids)) for out in engine.step())
    elapsed = time.perf_counter() - started
    return outputs, sum(map(len, outputs.values())) / elapsed


def batches(args: argparse.Namespace, vocab_size: int) -> dict[int, list[list[int]]]:
    rng = random.Random(0)
    return {b: [[rng.randrange(vocab_size) for _ in range(args.input_len)] for _ in range(b)] for b in args.batch}


def timed_runs(engine: LLMEngine, prompts: list[list[int]], tag: str, args: argparse.Namespace
               ) -> tuple[dict[str, list[int]], float]:
    """A warm-up run, then the best tokens/s of --repeats runs; the outputs keyed by prompt index."""
    best, outputs = 0.0, {}
    for rep in range(args.repeats + 1):
        ids = {f"{tag}-{rep}-{i}": p for i, p in enumerate(prompts)}
        out, rate = generate(engine, ids, args.output_len)
        outputs = {rid.rsplit("-", 1)[1]: tokens for rid, tokens in out.items()}
        best = max(best, rate) if rep else best
    return outputs, best


class TimedDraftModel:
    """Runs the draft model's proposer each step for its cost (keeping its KV in step with the
    tokens), then returns the replay's drafts, so acceptance stays controlled."""

    def __init__(self, draft: TokenProposer, replay: ReplayProposer) -> None:
        self.draft = draft
        self.replay = replay
        self.num_speculative_tokens = replay.num_speculative_tokens
        self.reset()

    def reset(self) -> None:
        self.seconds, self.calls = 0.0, 0

    def propose(self, requests: Sequence[Request]) -> dict[str, list[int]]:
        started = time.perf_counter()
        self.draft.propose(requests)
        self.seconds += time.perf_counter() - started
        self.calls += 1
        return self.replay.propose(requests)


def _spec_engine(
    config: EngineConfig, replay: ReplayProposer, args: argparse.Namespace
) -> tuple[LLMEngine, TimedDraftModel | None]:
    if args.draft_model is None:
        return LLMEngine(config, replay), None
    k = replay.num_speculative_tokens
    speculative = {"method": "draft_model", "model": args.draft_model, "num_speculative_tokens": k}
    engine = LLMEngine(dataclasses.replace(config, speculative_config=speculative))
    core = engine.engine_core.engine_core
    core.proposer = timed = TimedDraftModel(core.proposer, replay)
    return engine, timed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="shared/models/llama-3.1-8b",
                        help="model directory (its weights: see --load-format)")
    parser.add_argument("--load-format", default="dummy", help="dummy: random weights of the model's shape")
    parser.add_argument("--alpha", type=float, nargs="+", default=[0.7], help="probability a draft token is right")
    parser.add_argument("-k", "--num-speculative-tokens", type=int, default=4, help="drafts per step")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8, 64], help="batch sizes")
    parser.add_argument("--input-len", type=int, default=128, help="prompt tokens per request")
    parser.add_argument("--output-len", type=int, default=256, help="output tokens per request")
    parser.add_argument("--max-model-len", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=2, help="timed runs of each (after a warm-up); the best is kept")
    parser.add_argument("--device", default="auto", help="cuda, cpu or auto")
    parser.add_argument("--draft-model", default=None,
                        help="also run this draft model (method draft_model, same --load-format) each step for its "
                             "cost, while the replay decides the drafts; prints the draft's time per step")
    args = parser.parse_args()
    config = EngineConfig(model=args.model, load_format=args.load_format, max_model_len=args.max_model_len,
                          skip_tokenizer_init=True, device=args.device, max_num_seqs=max(args.batch))

    plain = LLMEngine(config)
    prompts = batches(args, plain.processor.vocab_size)
    vocab_size = plain.processor.vocab_size
    baseline = {b: timed_runs(plain, prompts[b], "plain", args) for b in args.batch}
    plain.engine_core.shutdown()
    del plain

    k = args.num_speculative_tokens
    for alpha in args.alpha:
        proposer = ReplayProposer({}, alpha, k, vocab_size)
        engine, timed = _spec_engine(config, proposer, args)
        scheduler = engine.engine_core.engine_core.scheduler
        for b in args.batch:
            expected, plain_rate = baseline[b]
            for rep in range(args.repeats + 1):  # every run's request ids get the futures of its prompts
                proposer.futures.update({f"spec-{rep}-{i}": expected[str(i)] for i in range(b)})
            before = scheduler.stats()
            if timed is not None:
                timed.reset()
            outputs, rate = timed_runs(engine, prompts[b], "spec", args)
            after = scheduler.stats()
            drafts = after.num_drafts - before.num_drafts
            accepted = after.num_accepted_tokens - before.num_accepted_tokens
            same = "same tokens" if outputs == expected else "DIFFERENT tokens"
            print(f"batch {b:3d} alpha {alpha:.2f} k {k}: no speculation {plain_rate:9.1f} tok/s, replay "
                  f"{rate:9.1f} tok/s ({rate / plain_rate:.2f}x, {same}); mean acceptance length "
                  f"{1 + accepted / max(drafts, 1):.2f} (expected {sum(alpha**i for i in range(k + 1)):.2f})",
                  flush=True)
            if timed is not None:
                print(f"    draft model: {1000 * timed.seconds / max(timed.calls, 1):.2f} ms per engine step "
                      f"({timed.calls} steps, k={k} draft forward passes each)", flush=True)
        engine.engine_core.shutdown()
        del engine


if __name__ == "__main__":
    main()
