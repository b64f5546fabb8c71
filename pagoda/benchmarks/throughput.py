"""`pagoda bench throughput`: offline throughput on random-token requests (or a ShareGPT file's:
benchmarks/datasets.py), as `vllm bench throughput` measures it, with `transformers` (or llama.cpp) on the same requests as the peer;
several backends run one after another, and --plot draws them side by side. With --num-loras N,
Pagoda runs the requests twice on one engine: without adapters, then with N random adapters of
--lora-rank assigned round-robin."""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pagoda.benchmarks.datasets import BenchRequest, add_dataset_arguments, make_requests, sharegpt_requests
from pagoda.benchmarks.plot import plot_throughput
from pagoda.entrypoints.engine_args import add_engine_arguments, engine_kwargs


@dataclass
class BenchResult:
    backend: str
    num_requests: int
    elapsed_s: float
    prompt_tokens: int
    output_tokens: int

    @property
    def requests_per_s(self) -> float:
        return self.num_requests / self.elapsed_s

    @property
    def output_tokens_per_s(self) -> float:
        return self.output_tokens / self.elapsed_s

    @property
    def total_tokens_per_s(self) -> float:
        return (self.prompt_tokens + self.output_tokens) / self.elapsed_s

    def report(self) -> str:
        return (
            f"[{self.backend}] {self.num_requests} requests in {self.elapsed_s:.2f} s: "
            f"{self.requests_per_s:.2f} requests/s, {self.total_tokens_per_s:.2f} total tokens/s, "
            f"{self.output_tokens_per_s:.2f} output tokens/s"
        )

    def to_json(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "requests_per_second": self.requests_per_s,
            "tokens_per_second": self.total_tokens_per_s,
            "output_tokens_per_second": self.output_tokens_per_s,
        }


def run_pagoda(args: argparse.Namespace, requests: list[BenchRequest]) -> BenchResult | list[BenchResult]:
    """One result; with --num-loras, the base model's and the adapters' on the same engine."""
    from pagoda import LLM

    # Prompts are token ids and outputs are counted, not read: no tokenizer is needed
    # (a --load-format dummy model directory often has none).
    kwargs = {**engine_kwargs(args), "skip_tokenizer_init": True}
    if args.num_loras:
        kwargs.update(enable_lora=True, max_loras=max(args.max_loras, args.num_loras),
                      max_lora_rank=max(args.max_lora_rank, args.lora_rank))
    llm = LLM(**kwargs)
    base = _timed_generate(llm, args, requests, "pagoda")
    if not args.num_loras:
        return base
    from pagoda.benchmarks.lora_adapters import write_random_adapters
    from pagoda.lora.request import LoRARequest

    with tempfile.TemporaryDirectory() as directory:
        spec = llm.llm_engine.processor.config.model.spec
        paths = write_random_adapters(spec, Path(directory), args.num_loras, args.lora_rank, args.seed)
        loras = [LoRARequest(f"lora-{i}", i + 1, str(path)) for i, path in enumerate(paths)]
        name = f"pagoda+{args.num_loras} LoRAs r={args.lora_rank}"
        with_loras = _timed_generate(llm, args, requests, name, [loras[i % len(loras)] for i in range(len(requests))])
    return [base, with_loras]


def _timed_generate(
    llm: Any, args: argparse.Namespace, requests: list[BenchRequest], name: str, loras: list[Any] | None = None
) -> BenchResult:
    from pagoda import SamplingParams

    prompts = [{"prompt_token_ids": r.prompt_token_ids} for r in requests]
    params = [
        SamplingParams(temperature=0.0, max_tokens=r.output_len, ignore_eos=True, detokenize=False)
        for r in requests
    ]
    # Warm up once (allocator, lazy inits; each adapter read) so the timing measures serving, not start-up.
    warm = (list(dict.fromkeys(loras)) if loras else [None])[: len(prompts)]
    llm.generate(prompts[: len(warm)], SamplingParams(max_tokens=2, ignore_eos=True), use_tqdm=False,
                 lora_request=warm)
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=not args.disable_tqdm, lora_request=loras)
    elapsed = time.perf_counter() - start
    output_tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    return BenchResult(name, len(requests), elapsed, _prompt_tokens(requests), output_tokens)


def run_hf(args: argparse.Namespace, requests: list[BenchRequest]) -> BenchResult:
    """transformers `generate` in static batches of --hf-max-batch-size, greedy, EOS ignored."""
    model, pad = load_hf_model(args)
    start = time.perf_counter()
    output_tokens = 0
    for i in range(0, len(requests), args.hf_max_batch_size):
        output_tokens += hf_generate(model, requests[i : i + args.hf_max_batch_size], pad)
    elapsed = time.perf_counter() - start
    return BenchResult("hf", len(requests), elapsed, _prompt_tokens(requests), output_tokens)


def load_hf_model(args: argparse.Namespace) -> tuple[Any, int]:
    """The transformers model of --model (random weights with --load-format dummy), in bf16 on a
    GPU, fp32 on the CPU; and its pad token id."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from pagoda.loader.model_loader import load_hf_config
    from pagoda.loader.model_resolver import resolve_model

    resolved = resolve_model(args.model, args.load_format, revision=args.revision, download_dir=args.download_dir)
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    with device:
        if args.load_format == "dummy":
            config = load_hf_config(resolved)
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        else:
            config = AutoConfig.from_pretrained(resolved.model_dir, local_files_only=True)
            model = AutoModelForCausalLM.from_pretrained(resolved.model_dir, dtype=dtype, local_files_only=True)
    pad = config.pad_token_id if isinstance(getattr(config, "pad_token_id", None), int) else 0
    return model.eval(), pad


def hf_generate(model: Any, batch: list[BenchRequest], pad: int) -> int:
    """One static batch through transformers `generate`, synchronously; the tokens asked for."""
    import torch

    width = max(len(r.prompt_token_ids) for r in batch)
    ids = torch.full((len(batch), width), pad, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, r in enumerate(batch):  # left padding, as decoder-only generation needs
        ids[row, width - len(r.prompt_token_ids) :] = torch.tensor(r.prompt_token_ids)
        mask[row, width - len(r.prompt_token_ids) :] = 1
    new = max(r.output_len for r in batch)
    with torch.inference_mode():
        model.generate(
            input_ids=ids.to(model.device), attention_mask=mask.to(model.device), max_new_tokens=new,
            min_new_tokens=new, do_sample=False, pad_token_id=pad,
        )
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    # A static batch runs every row to the longest output; count only what each request asked.
    return sum(r.output_len for r in batch)


def run_llama_cpp(args: argparse.Namespace, requests: list[BenchRequest]) -> BenchResult:
    """llama.cpp (llama-cpp-python) on the same GGUF, one request after another, greedy."""
    from llama_cpp import Llama

    from pagoda.loader.default_model import default_gguf_path
    from pagoda.loader.model_resolver import resolve_model

    gguf_file = default_gguf_path() if args.model is None else resolve_model(args.model, "gguf").gguf_file
    llm = Llama(
        model_path=str(gguf_file), n_ctx=4096, n_threads=args.llama_cpp_threads,
        n_batch=512, verbose=False, seed=args.seed,
    )
    start = time.perf_counter()
    output_tokens = 0
    for r in requests:
        llm.reset()
        generated = 0
        for _ in llm.generate(r.prompt_token_ids, temp=0.0, top_k=1, reset=True):
            generated += 1
            if generated == r.output_len:
                break
        output_tokens += generated
    elapsed = time.perf_counter() - start
    return BenchResult("llama.cpp", len(requests), elapsed, _prompt_tokens(requests), output_tokens)


def _prompt_tokens(requests: list[BenchRequest]) -> int:
    return sum(len(r.prompt_token_ids) for r in requests)


BACKENDS = {"pagoda": run_pagoda, "hf": run_hf, "llama.cpp": run_llama_cpp}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="model path, GGUF file or cached HF id (default: the embedded model)")
    parser.add_argument("--backend", type=_backends, default=["pagoda"],
                        help=f"what runs the requests: pagoda, or a peer on the same requests ({', '.join(BACKENDS)}); "
                             "a comma-separated list (pagoda,hf) runs each in turn (default: pagoda)")
    add_engine_arguments(parser)
    parser.add_argument("--num-prompts", type=int, default=256, help="requests (default: %(default)s)")
    add_dataset_arguments(parser)
    parser.add_argument("--input-len", "--random-input-len", type=int, default=512,
                        help="prompt tokens per request (default: %(default)s)")
    parser.add_argument("--output-len", "--random-output-len", type=int, default=256,
                        help="output tokens per request (default: %(default)s)")
    parser.add_argument("--random-range-ratio", type=float, default=0.0,
                        help="lengths uniform in [len*(1-r), len*(1+r)]")
    parser.add_argument("--hf-max-batch-size", type=int, default=64, help="static batch size of --backend hf")
    parser.add_argument("--llama-cpp-threads", type=int, default=2, help="threads of --backend llama.cpp")
    parser.add_argument("--num-loras", type=int, default=0,
                        help="also run Pagoda with this many random LoRA adapters, assigned to the requests "
                             "round-robin (--max-loras is raised to it), after the base model on the same engine")
    parser.add_argument("--lora-rank", type=int, default=16, help="the rank of --num-loras' adapters (default: %(default)s)")
    parser.add_argument("--disable-tqdm", action="store_true", help="no progress bar")
    parser.add_argument("--output-json", default=None,
                        help="write the results to this file (a list of them, one per backend, for several backends)")
    parser.add_argument("--plot", default=None, metavar="FILE.png",
                        help="draw the backends' throughputs side by side into this PNG (matplotlib), with the data "
                             "drawn beside it as FILE.json")


def _backends(text: str) -> list[str]:
    names = text.split(",")
    unknown = [name for name in names if name not in BACKENDS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown backend(s) {unknown}: choose from {', '.join(BACKENDS)}")
    return names


def main(args: argparse.Namespace) -> BenchResult | list[BenchResult]:
    """The result, as written to --output-json: one for one backend, a list of them for several."""
    from pagoda.loader.default_model import DEFAULT_MODEL
    from pagoda.loader.model_loader import load_hf_config, load_tokenizer
    from pagoda.loader.model_resolver import resolve_engine_model

    resolved = resolve_engine_model(args)
    if args.dataset_name == "sharegpt":
        tokenizer = load_tokenizer(resolved, args.tokenizer, args.tokenizer_mode)
        requests = sharegpt_requests(args, tokenizer.encode)
        workload = f"{args.num_prompts} ShareGPT requests"
    else:
        requests = make_requests(
            args.num_prompts, args.input_len, args.output_len, load_hf_config(resolved).vocab_size, args.seed,
            args.random_range_ratio,
        )
        workload = f"{args.num_prompts} requests of {args.input_len} prompt + {args.output_len} output tokens"
    results = []
    for backend in args.backend:
        result = BACKENDS[backend](args, requests)
        for one in result if isinstance(result, list) else [result]:
            results.append(one)
            print(one.report())
    as_json = [result.to_json() for result in results]
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(as_json[0] if len(results) == 1 else as_json, f, indent=2)
    if args.plot:
        plot_throughput(as_json, args.model or DEFAULT_MODEL, workload, args.plot)
    return results[0] if len(results) == 1 else results
