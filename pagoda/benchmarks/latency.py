"""`pagoda bench latency`: one batch of requests end to end, as `vllm bench latency` measures it,
and the decode latency per output token: (a run of --output-len tokens - a run of one token)
/ (output-len - 1), so the prompt's prefill is not counted. Every run gets new random prompts,
so that none is served from the prefix cache: the one-token run's time is the prefill's, also
reported as prefill tokens/s. `--backend hf` runs transformers on the same requests."""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time
from collections.abc import Callable

from pagoda.benchmarks.datasets import BenchRequest, make_requests
from pagoda.benchmarks.throughput import hf_generate, load_hf_model
from pagoda.entrypoints.engine_args import add_engine_arguments, engine_kwargs

# Runs a batch with every request's output_len overridden, synchronously.
Generate = Callable[[list[BenchRequest], int], None]
# A new batch of random prompts at each call.
NewBatch = Callable[[], list[BenchRequest]]


def _pagoda(args: argparse.Namespace) -> Generate:
    from pagoda import LLM, SamplingParams

    llm = LLM(**{**engine_kwargs(args), "skip_tokenizer_init": True})

    def generate(requests: list[BenchRequest], output_len: int) -> None:
        params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True, detokenize=False)
        llm.generate([{"prompt_token_ids": r.prompt_token_ids} for r in requests], params, use_tqdm=False)

    return generate


def _hf(args: argparse.Namespace) -> Generate:
    model, pad = load_hf_model(args)

    def generate(requests: list[BenchRequest], output_len: int) -> None:
        hf_generate(model, [BenchRequest(r.prompt_token_ids, output_len) for r in requests], pad)

    return generate


BACKENDS = {"pagoda": _pagoda, "hf": _hf}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="model path, GGUF file or cached HF id (default: the embedded model)")
    parser.add_argument("--backend", default="pagoda", choices=sorted(BACKENDS),
                        help="what runs the requests: pagoda, or a peer on the same requests (default: %(default)s)")
    add_engine_arguments(parser)
    parser.add_argument("--batch-size", type=int, default=1, help="requests in the batch (default: %(default)s)")
    parser.add_argument("--input-len", type=int, default=32, help="prompt tokens per request (default: %(default)s)")
    parser.add_argument("--output-len", type=int, default=128, help="output tokens per request (default: %(default)s)")
    parser.add_argument("--num-iters", type=int, default=3, help="timed runs of each length (the median is kept)")
    parser.add_argument("--num-iters-warmup", type=int, default=1,
                        help="untimed runs of two output tokens first: lazy initialisation, allocator, kernels "
                             "(default: %(default)s)")
    parser.add_argument("--output-json", default=None, help="write the results to this file")


def _median_seconds(generate: Generate, new_batch: NewBatch, output_len: int, iters: int) -> float:
    times = []
    for _ in range(iters):
        requests = new_batch()  # made before the clock starts
        start = time.perf_counter()
        generate(requests, output_len)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(args: argparse.Namespace) -> dict[str, float]:
    from pagoda.loader.model_loader import load_hf_config
    from pagoda.loader.model_resolver import resolve_engine_model

    if args.output_len < 2:
        raise ValueError(f"--output-len={args.output_len} is too short: at least 2 tokens are needed")
    resolved = resolve_engine_model(args)
    vocab_size = load_hf_config(resolved).vocab_size
    seeds = itertools.count(args.seed)

    def new_batch() -> list[BenchRequest]:
        return make_requests(args.batch_size, args.input_len, args.output_len, vocab_size, next(seeds))

    generate = BACKENDS[args.backend](args)
    for _ in range(args.num_iters_warmup):
        generate(new_batch(), 2)
    full = _median_seconds(generate, new_batch, args.output_len, args.num_iters)
    first = _median_seconds(generate, new_batch, 1, args.num_iters)
    result = {
        "backend": args.backend,
        "batch_size": args.batch_size,
        "input_len": args.input_len,
        "output_len": args.output_len,
        "latency_s": full,
        "first_token_s": first,
        "prefill_tokens_per_s": args.batch_size * args.input_len / first,
        "decode_ms_per_token": (full - first) / (args.output_len - 1) * 1e3,
    }
    print(
        f"[{args.backend}] batch {args.batch_size}, {args.input_len} in, {args.output_len} out: "
        f"{full:.3f} s end to end, first token {first * 1e3:.1f} ms "
        f"({result['prefill_tokens_per_s']:.0f} prefill tokens/s), "
        f"decode {result['decode_ms_per_token']:.2f} ms per output token"
    )
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(result, f, indent=2)
    return result
