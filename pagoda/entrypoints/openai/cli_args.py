"""`pagoda serve`'s flags, named as vLLM's."""

from __future__ import annotations

import argparse
import json
import os


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", nargs="?", default=None,
                        help="a local HF directory, a GGUF file or a cached model id (default: the embedded model)")
    parser.add_argument("--host", default=None, help="address to listen on (default: all interfaces)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--served-model-name", nargs="+", default=None,
                        help="the name(s) clients use in `model` (default: the model argument)")
    parser.add_argument("--api-key", default=os.environ.get("PAGODA_API_KEY"),
                        help="require `Authorization: Bearer KEY` on /v1 (default: $PAGODA_API_KEY)")
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
    parser.add_argument("--chat-template", default=None, help="a Jinja file, or the template itself")
    parser.add_argument("--load-format", default="auto")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--tensor-parallel-size", "-tp", type=int, default=1)
    # SUPPRESS: given after `serve`, it overrides the top-level --log-level; absent, it leaves it.
    parser.add_argument("--log-level", default=argparse.SUPPRESS, choices=["debug", "info", "warning", "error"])
    parser.add_argument("--disable-log-requests", action="store_true", help="no log line per request")
    parser.add_argument("--allowed-origins", type=json.loads, default=["*"], help='CORS origins, JSON: ["*"]')
