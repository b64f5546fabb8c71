"""Structured outputs' host and mask costs on the CPU, on the default model's vocabulary: grammar
compile time (cold: a fresh compiler; cached: a constraint the engine has seen), and the per-step
cost of masking for a batch of constrained requests (filling each request's bitmask row, then
applying the batch's masks to the logits), through the engine's own StructuredOutputManager.

    python scripts/bench_structured_outputs.py [--model M] [--num-requests 64] [--steps 100]

Each step samples every request's next token greedily from random logits under its mask, so
the requests walk their grammars as a model would; a request whose grammar ends starts again."""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from pagoda.config import EngineConfig
from pagoda.core.request import Request, RequestStatus
from pagoda.core.scheduler import ScheduledChunk
from pagoda.engine.input_processor import InputProcessor
from pagoda.sampling_params import SamplingParams, StructuredOutputsParams
from pagoda.structured_output.bitmask import apply_grammar_bitmask
from pagoda.structured_output.grammar import GrammarCompiler
from pagoda.structured_output.manager import StructuredOutputManager

# The shapes the tests use: nested objects, arrays, enums, required fields, bounded numbers, patterns.
SCHEMAS = {
    "order": {
        "type": "object",
        "properties": {
            "id": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"},
            "customer": {"type": "object", "properties": {
                "name": {"type": "string"}, "email": {"type": "string", "format": "email"},
                "tier": {"enum": ["free", "pro", "enterprise"]}}, "required": ["name", "tier"]},
            "items": {"type": "array", "minItems": 1, "maxItems": 5, "items": {"type": "object", "properties": {
                "sku": {"type": "string"}, "quantity": {"type": "integer", "minimum": 1, "maximum": 100},
                "price": {"type": "number", "minimum": 0}}, "required": ["sku", "quantity", "price"]}},
            "paid": {"type": "boolean"},
        },
        "required": ["id", "customer", "items", "paid"],
    },
    "person": {"type": "object", "properties": {
        "name": {"type": "string"}, "age": {"type": "integer", "minimum": 0, "maximum": 150}},
        "required": ["name", "age"]},
    "list": {"type": "array", "items": {"type": "integer"}, "maxItems": 8},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None,
                        help="model whose tokenizer gives the vocabulary (default: the embedded one)")
    parser.add_argument("--num-requests", type=int, default=64, help="constrained requests in the batch")
    parser.add_argument("--steps", type=int, default=100, help="steps to time")
    parser.add_argument("--schema", choices=sorted(SCHEMAS), default="order", help="the requests' JSON schema")
    args = parser.parse_args()
    processor = InputProcessor(EngineConfig(model=args.model))
    vocab = processor.core_model.grammar_vocab
    eos = processor.core_model.eos_token_ids
    print(f"vocabulary: {processor.vocab_size} tokens")
    compile_times(vocab)
    mask_times(vocab, eos, processor.vocab_size, SCHEMAS[args.schema], args.num_requests, args.steps)


def compile_times(vocab: str) -> None:
    manager = StructuredOutputManager(vocab)
    for name, schema in SCHEMAS.items():
        params = StructuredOutputsParams(json=schema)
        compiler = GrammarCompiler(vocab)  # a fresh compiler: nothing cached
        started = time.perf_counter()
        compiler.compile(params)
        cold = time.perf_counter() - started
        _ready(manager, params)  # compiled once here ...
        started = time.perf_counter()
        _ready(manager, params)  # ... and found compiled
        cached = time.perf_counter() - started
        print(f"compile {name}: cold {cold * 1e3:.1f} ms, cached {cached * 1e3:.3f} ms (request ready to run)")


def _ready(manager: StructuredOutputManager, params: StructuredOutputsParams) -> Request:
    req = Request(f"r{time.perf_counter_ns()}", [0], SamplingParams(structured_outputs=params), frozenset(), 4096)
    manager.add_request(req)
    while req.waiting_for_grammar:
        manager.wait_for_compiles(1.0)
        manager.take_compiled()
    return req


def mask_times(vocab: str, eos: frozenset[int], vocab_size: int, schema: dict, num_requests: int, steps: int) -> None:
    manager = StructuredOutputManager(vocab)
    params = StructuredOutputsParams(json=schema)
    requests = [_ready(manager, params) for _ in range(num_requests)]
    generator = torch.Generator().manual_seed(0)
    fill, apply = [], []
    for _ in range(steps):
        chunks = [ScheduledChunk(req, req.num_tokens - 1, 1, [], True) for req in requests]
        started = time.perf_counter()
        masks = manager.bitmask(chunks)
        fill.append(time.perf_counter() - started)
        logits = torch.randn(num_requests, vocab_size, generator=generator)
        started = time.perf_counter()
        apply_grammar_bitmask(logits, masks)
        apply.append(time.perf_counter() - started)
        for i, (req, token) in enumerate(zip(requests, logits.argmax(dim=-1).tolist())):
            req.append_output_token(token)
            if token in eos:
                req.status = RequestStatus.FINISHED_STOPPED
            manager.accept([(req, 1)])
            if token in eos:
                requests[i] = _ready(manager, params)
    for name, times in (("fill bitmasks", fill), ("apply to logits", apply)):
        print(f"{name} for {num_requests} requests: {statistics.mean(times) * 1e3:.2f} ms/step mean, "
              f"{statistics.median(times) * 1e3:.2f} median")
    total = [a + b for a, b in zip(fill, apply)]
    print(f"masking per step: {statistics.mean(total) * 1e3:.2f} ms mean")


if __name__ == "__main__":
    main()
