"""The engine's command-line flags, shared by `pagoda serve` and `pagoda bench throughput`."""

from __future__ import annotations

import argparse
from dataclasses import fields
from typing import Any

from pagoda.config import LOAD_FORMATS, EngineConfig


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    """Every EngineConfig knob but the model, named as vLLM names them."""
    parser.add_argument("--tokenizer", default=None)
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--max-num-batched-tokens", type=int, default=None)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    parser.add_argument("--num-gpu-blocks-override", type=int, default=None)
    parser.add_argument("--kv-cache-memory-bytes", type=int, default=None)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--enable-chunked-prefill", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--load-format", default="auto", choices=LOAD_FORMATS)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--skip-tokenizer-init", action="store_true",
                        help="load no tokenizer: prompts must be token ids, outputs carry no text")
    parser.add_argument(
        "--enforce-eager", action="store_true",
        help="run every step eagerly: no CUDA graphs (faster start-up, slower small-batch decode)",
    )
    parser.add_argument(
        "--async-scheduling", action=argparse.BooleanOptionalAction, default=None,
        help="plan and queue each step while the GPU runs the one before (default: on with one GPU)",
    )
    parser.add_argument("--tensor-parallel-size", "-tp", type=int, default=1)
    parser.add_argument("--pipeline-parallel-size", "-pp", type=int, default=1)


def engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The parsed flags that are EngineConfig fields, by field name."""
    return {f.name: getattr(args, f.name) for f in fields(EngineConfig) if hasattr(args, f.name)}
