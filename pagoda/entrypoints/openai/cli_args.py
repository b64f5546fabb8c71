"""`pagoda serve`'s flags, named as vLLM's."""

from __future__ import annotations

import argparse
import json
import os

from pagoda.entrypoints.engine_args import add_engine_arguments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", nargs="?", default=None,
                        help="a local HF directory, a GGUF file or a cached model id (default: the embedded model)")
    parser.add_argument("--host", default=None, help="address to listen on (default: all interfaces)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--served-model-name", nargs="+", default=None,
                        help="the name(s) clients use in `model` (default: the model argument)")
    parser.add_argument("--api-key", default=os.environ.get("PAGODA_API_KEY"),
                        help="require `Authorization: Bearer KEY` on /v1 (default: $PAGODA_API_KEY)")
    add_engine_arguments(parser)
    # A server knob, not an engine one: offline LLM is one engine core.
    parser.add_argument("--data-parallel-size", "-dp", type=int, default=1,
                        help="engine cores behind this server, each on its own tensor x pipeline GPUs")
    parser.add_argument("--chat-template", default=None, help="a Jinja file, or the template itself")
    parser.add_argument(
        "--generation-config", default="auto",
        help="default sampling parameters for requests that leave them unset: 'auto' takes them from the "
             "model's generation_config.json, 'vllm' (or 'pagoda') uses the engine's own defaults, a folder "
             "takes its generation_config.json",
    )
    # SUPPRESS: given after `serve`, it overrides the top-level --log-level; absent, it leaves it.
    parser.add_argument("--log-level", default=argparse.SUPPRESS, choices=["debug", "info", "warning", "error"])
    parser.add_argument("--disable-log-requests", action="store_true", help="no log line per request")
    # CORS, as vLLM: any origin, method and header, but no credentials unless asked for.
    parser.add_argument("--allowed-origins", type=json.loads, default=["*"], help='CORS origins, a JSON list: ["*"]')
    parser.add_argument("--allow-credentials", action="store_true",
                        help="let browsers send cookies and auth headers cross-origin (CORS credentials; off by default)")
    parser.add_argument("--allowed-methods", type=json.loads, default=["*"], help='CORS methods, a JSON list: ["*"]')
    parser.add_argument("--allowed-headers", type=json.loads, default=["*"], help='CORS headers, a JSON list: ["*"]')
