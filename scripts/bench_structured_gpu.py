"""Structured outputs' cost on the GPU, as issue 14 measures it: W1's shape (the Llama-3.1-8B
config, random weights, 256 requests of 512 random prompt tokens) where every request carries a
mid-sized JSON schema and ends where the schema does, against the same requests unconstrained,
each given the very output length its constrained twin produced (EOS ignored), in one process.

    python scripts/bench_structured_gpu.py --model shared/models/llama-3.1-8b [--tokenizer DIR]

Random weights have no tokenizer: the default model's (49,152 tokens) stands in, its vocabulary
padded to the model's (xgrammar masks the ids past it). Prints output tokens/s of both runs and
the constrained run's slowdown per output token."""

from __future__ import annotations

import argparse
import json
import random
import time

from pagoda import LLM, SamplingParams, StructuredOutputsParams
from pagoda.loader.default_model import default_model_dir

SCHEMA = {
    "type": "object",
    "properties": {
        "id": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"},
        "tier": {"enum": ["free", "pro", "enterprise"]},
        "quantity": {"type": "integer", "minimum": 1, "maximum": 100},
        "tags": {"type": "array", "minItems": 1, "maxItems": 4, "items": {"type": "string", "pattern": "^[a-z]{2,8}$"}},
        "address": {"type": "object", "properties": {
            "city": {"type": "string", "pattern": "^[A-Z][a-z]{2,12}$"}, "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
        }, "required": ["city", "zip"], "additionalProperties": False},
        "paid": {"type": "boolean"},
    },
    "required": ["id", "tier", "quantity", "tags", "address", "paid"],
    "additionalProperties": False,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--tokenizer", default=None, help="default: the embedded default model's")
    parser.add_argument("--num-prompts", type=int, default=256)
    parser.add_argument("--input-len", type=int, default=512)
    args = parser.parse_args()
    # No prefix caching: the second run's prompts are the first's, and must be computed again.
    llm = LLM(model=args.model, tokenizer=args.tokenizer or str(default_model_dir()), load_format="dummy",
              max_model_len=1024, enable_prefix_caching=False)
    rng = random.Random(0)
    prompts = [{"prompt_token_ids": [rng.randrange(49152) for _ in range(args.input_len)]}
               for _ in range(args.num_prompts)]
    constraint = StructuredOutputsParams(json=SCHEMA, disable_any_whitespace=True)
    constrained = [SamplingParams(temperature=0.0, max_tokens=400, structured_outputs=constraint)] * len(prompts)
    llm.generate(prompts[:4], constrained[:4], use_tqdm=False)  # warm-up: compile the grammar, the kernels
    started = time.perf_counter()
    outputs = llm.generate(prompts, constrained, use_tqdm=False)
    constrained_s = time.perf_counter() - started
    lengths = [len(o.outputs[0].token_ids) for o in outputs]
    valid = sum(o.outputs[0].finish_reason == "stop" and _parses(o.outputs[0].text) for o in outputs)
    free = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in lengths]
    started = time.perf_counter()
    llm.generate(prompts, free, use_tqdm=False)
    free_s = time.perf_counter() - started
    tokens = sum(lengths)
    print(f"{len(prompts)} requests, {tokens} output tokens (mean {tokens / len(prompts):.0f}), {valid} valid JSON")
    print(f"constrained {constrained_s:.2f} s ({tokens / constrained_s:.0f} out tok/s), unconstrained {free_s:.2f} s "
          f"({tokens / free_s:.0f} out tok/s): {100 * (constrained_s / free_s - 1):+.1f} % per output token")


def _parses(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


if __name__ == "__main__":
    main()
