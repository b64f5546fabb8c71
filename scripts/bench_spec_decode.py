"""Speculative decoding's engine side at a controlled acceptance rate (issue 19, "Measure"), with
random weights of the model's shape.

(b), the default: end-to-end output tokens/s with and without speculation, greedy, at several
batch sizes, in one run. The drafts replay each request's own greedy continuation (from the run
without speculation) with each token corrupted with probability 1 - alpha (pagoda/benchmarks/
replay_proposer.py), so acceptance is controlled even with random weights. Prints, per batch
size and alpha: tokens/s of each, the speedup, and the mean acceptance length (tokens a
verifying step gave a request: 1 + accepted / drafts; expected 1 + alpha + ... + alpha^k).

    PYTHONPATH=. python scripts/bench_spec_decode.py --model shared/models/llama-3.1-8b \\
        --alpha 0.5 0.7 0.9 -k 4 --batch 1 8 64 [--draft-model llama-1b-shape]

With --draft-model, the engine also runs that draft (method draft_model) every step for its cost
while the replay still decides the drafts, and prints the draft's time per engine step.
`--draft-model llama-1b-shape` synthesizes the draft: Llama-3.2-1B's shape with the target's
vocabulary and rope, written to a temporary directory.

(a), --step-times: the time of a model-runner step in which every request verifies q = k+1 query
tokens (its last token and k drafts), q = 1..9, at each batch size, against the one-token decode
step (q = 1). One engine serves every q: its decode CUDA graphs are recaptured for all of them,
and the drafts' count is set per run. A step is timed from a device sync before it to the read of
its sampled tokens (the engine's own launch and read, rejection sampling included); only steps in
which every request is decoding with q query tokens count.

    PYTHONPATH=. python scripts/bench_spec_decode.py --model shared/models/llama-3.1-8b --step-times

--tiny: a tiny random llama instead of --model (and a tiny draft for llama-1b-shape), to check
the script end to end where there is no GPU (--device auto: the CPU there).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import random
import statistics
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from pagoda import SamplingParams
from pagoda.benchmarks.replay_proposer import ReplayProposer
from pagoda.config import EngineConfig
from pagoda.core.request import Request
from pagoda.core.scheduler import SchedulerOutput
from pagoda.engine.llm_engine import LLMEngine
from pagoda.spec.proposer import TokenProposer
from pagoda.worker.model_runner import ModelRunner, PendingStep
from tests.tiny_models import save_tiny_model

SYNTHESIZED_DRAFT = "llama-1b-shape"
# meta-llama/Llama-3.2-1B's config.json values; the vocabulary and rope stay the target's.
LLAMA_1B_SHAPE = {
    "hidden_size": 2048, "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8,
    "head_dim": 64, "intermediate_size": 8192, "tie_word_embeddings": True,
}
TINY_DRAFT_SHAPE = {
    "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16,
    "intermediate_size": 64, "tie_word_embeddings": True,
}
MAX_QUERY_LEN = 9  # --step-times measures q = 1..9: up to k = 8 drafts


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
    config: EngineConfig, replay: ReplayProposer, draft_model: str | None
) -> tuple[LLMEngine, TimedDraftModel | None]:
    if draft_model is None:
        return LLMEngine(config, replay), None
    k = replay.num_speculative_tokens
    speculative = {"method": "draft_model", "model": draft_model, "num_speculative_tokens": k}
    engine = LLMEngine(dataclasses.replace(config, speculative_config=speculative))
    core = engine.engine_core.engine_core
    core.proposer = timed = TimedDraftModel(core.proposer, replay)
    return engine, timed


def save_draft_shape(target: Path, shape: dict, directory: Path) -> Path:
    """A draft model's config.json: the target's (its vocabulary, rope, dtype) in another shape."""
    config = json.loads((target / "config.json").read_text())
    path = directory / SYNTHESIZED_DRAFT
    path.mkdir()
    (path / "config.json").write_text(json.dumps({**config, **shape}, indent=2))
    return path


def end_to_end(config: EngineConfig, args: argparse.Namespace) -> None:
    """Measure (b): tokens/s with and without speculation at each batch size and alpha."""
    plain = LLMEngine(config)
    prompts = batches(args, plain.processor.vocab_size)
    vocab_size = plain.processor.vocab_size
    baseline = {b: timed_runs(plain, prompts[b], "plain", args) for b in args.batch}
    plain.engine_core.shutdown()
    del plain

    k = args.num_speculative_tokens
    for alpha in args.alpha:
        proposer = ReplayProposer({}, alpha, k, vocab_size)
        engine, timed = _spec_engine(config, proposer, args.draft_model)
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


class StepTimer:
    """Times each step the engine launches, from a device sync before it to the read of its
    samples, by query tokens per request: only steps in which every request decodes with the
    same number of query tokens."""

    def __init__(self, engine: LLMEngine) -> None:
        executor = engine.engine_core.engine_core.executor
        self._launch = executor.launch
        executor.launch = self.launch
        self.device = engine.engine_core.engine_core.config.device.device
        self.seconds: dict[int, list[float]] = defaultdict(list)

    def launch(self, scheduler_output: SchedulerOutput, defer_sampling: bool = False) -> PendingStep:
        assert not defer_sampling, "the step timer reads each step at once"
        self._sync()
        started = time.perf_counter()
        output = self._launch(scheduler_output).result()
        self._sync()
        query_len = _uniform_decode_query_len(scheduler_output)
        if query_len:
            self.seconds[query_len].append(time.perf_counter() - started)
        return PendingStep(output)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def _uniform_decode_query_len(scheduler_output: SchedulerOutput) -> int:
    """q when every request of the step decodes with q query tokens (its last token, q - 1 drafts); else 0."""
    lens = {1 + len(c.draft_token_ids) for c in scheduler_output.chunks}
    decoding = all(c.start >= c.request.num_prompt_tokens and c.num_tokens == 1 + len(c.draft_token_ids)
                   for c in scheduler_output.chunks)
    return lens.pop() if decoding and len(lens) == 1 else 0


def _capture_every_query_len(runner: ModelRunner, sizes: list[int]) -> str:
    """Recapture the runner's decode graphs for q = 1..MAX_QUERY_LEN at these batch sizes (the
    engine captures 1 and 1 + k only), over the same pool; says what the steps run in."""
    graphs = runner.decode_graphs
    if graphs is None:
        return "eager steps (no CUDA graphs)"
    scratch_block = graphs.scratch_block
    runner.decode_graphs = graphs = None  # the old graphs' memory goes back before the new capture
    runner.graph_query_lens = list(range(1, MAX_QUERY_LEN + 1))
    runner.decode_graphs = runner._decode_graphs(runner.kv_caches, scratch_block, sorted(sizes))
    with torch.inference_mode():
        runner.decode_graphs.capture()
    return f"CUDA graphs for q=1..{MAX_QUERY_LEN} at batch sizes {sorted(sizes)}"


def step_times(config: EngineConfig, args: argparse.Namespace) -> None:
    """Measure (a): the median time of a step with q query tokens per request, q = 1..9, per batch size."""
    # Drafts are wrong (alpha 0) so that each step adds about one token, as a decode step does:
    # every q then runs over the same context lengths.
    proposer = ReplayProposer({}, alpha=0.0, k=MAX_QUERY_LEN - 1, vocab_size=1)
    engine = LLMEngine(config, proposer)
    proposer.vocab_size = engine.processor.vocab_size  # known once the engine has read the model
    print(_capture_every_query_len(engine.engine_core.engine_core.executor.worker.runner, args.batch), flush=True)
    timer = StepTimer(engine)
    prompts = batches(args, proposer.vocab_size)
    medians: dict[int, list[float]] = {}
    for b in args.batch:
        medians[b] = []
        for q in range(1, MAX_QUERY_LEN + 1):
            proposer.num_speculative_tokens = q - 1
            for rep in range(2):  # a warm-up run, then the timed one
                ids = {f"steps-{b}-{q}-{rep}-{i}": p for i, p in enumerate(prompts[b])}
                proposer.futures.update({rid: [0] * (args.steps + q) for rid in ids})
                if rep:
                    timer.seconds.clear()
                # Drafts stop q - 1 tokens before max_tokens: about --steps steps of q tokens first.
                generate(engine, ids, args.steps + q)
            measured = timer.seconds[q]
            assert measured, f"no step of batch {b} ran with {q} query tokens per request"
            medians[b].append(statistics.median(measured))
    engine.engine_core.shutdown()
    _print_step_table(medians, args.steps)


def _print_step_table(medians: dict[int, list[float]], steps: int) -> None:
    print(f"step times: median ms of a model-runner step with q query tokens per request (q - 1 drafts), over "
          f"up to {steps} steps, and its ratio to the one-token decode step (q=1)")
    print("batch " + "".join(f"{f'q={q}':>16}" for q in range(1, MAX_QUERY_LEN + 1)))
    for b, times in medians.items():
        cells = "".join(f"{1000 * t:8.2f} ({t / times[0]:4.2f}x)" for t in times)
        print(f"{b:5d} {cells}", flush=True)


@contextlib.contextmanager
def models(args: argparse.Namespace) -> Iterator[tuple[str, str | None]]:
    """The target's directory and the draft's (None: no draft), saving those the script makes."""
    with tempfile.TemporaryDirectory() as directory:
        target = args.model
        if args.tiny:
            target = str(save_tiny_model("llama3", Path(directory), max_position_embeddings=4096))
        draft = args.draft_model
        if draft == SYNTHESIZED_DRAFT:
            shape = TINY_DRAFT_SHAPE if args.tiny else LLAMA_1B_SHAPE
            draft = str(save_draft_shape(Path(target), shape, Path(directory)))
        yield target, draft


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
                             f"cost, while the replay decides the drafts; prints the draft's time per step. "
                             f"{SYNTHESIZED_DRAFT}: Llama-3.2-1B's shape with the target's vocabulary and rope")
    parser.add_argument("--step-times", action="store_true",
                        help="measure (a) instead: the time of a step with 1..9 query tokens per request")
    parser.add_argument("--steps", type=int, default=24, help="--step-times: steps of each batch size and q")
    parser.add_argument("--tiny", action="store_true", help="a tiny random llama instead of --model")
    args = parser.parse_args()
    if args.step_times and args.draft_model is not None:
        parser.error("--step-times times the target's steps alone: leave out --draft-model")
    with models(args) as (target, draft):
        args.draft_model = draft
        config = EngineConfig(model=target, load_format=args.load_format, max_model_len=args.max_model_len,
                              skip_tokenizer_init=True, device=args.device, max_num_seqs=max(args.batch))
        if args.step_times:
            step_times(config, args)
        else:
            end_to_end(config, args)


if __name__ == "__main__":
    main()
