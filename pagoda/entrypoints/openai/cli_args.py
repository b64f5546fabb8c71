"""`pagoda serve`'s flags, named as vLLM's."""

from __future__ import annotations

import argparse
import json
import os

from pagoda.entrypoints.engine_args import add_engine_arguments
from pagoda.entrypoints.openai.limits import RequestLimits


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # As vLLM: the model positional, or --model (the positional wins when both are given).
    parser.add_argument("model_tag", nargs="?", default=None, metavar="model",
                        help="a local HF directory, a GGUF file or a cached model id (default: the embedded model)")
    parser.add_argument("--host", default=None, help="address to listen on (default: all interfaces)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on (default: %(default)s)")
    parser.add_argument("--served-model-name", nargs="+", default=None,
                        help="the name(s) clients use in `model` (default: the model argument)")
    parser.add_argument("--api-key", default=os.environ.get("PAGODA_API_KEY") or os.environ.get("VLLM_API_KEY"),
                        help="require `Authorization: Bearer KEY` on /v1 (default: $PAGODA_API_KEY, else $VLLM_API_KEY)")
    parser.add_argument("--root-path", default=None,
                        help="the path prefix a proxy serves this server under (FastAPI's root_path), e.g. /llm")
    # data_parallel_size is a server knob, not an engine one: offline LLM is one engine core.
    add_engine_arguments(parser, skip=())
    parser.add_argument("--chat-template", default=None, help="a Jinja file, or the template itself")
    parser.add_argument(
        "--generation-config", default="auto",
        help="default sampling parameters for requests that leave them unset: 'auto' takes them from the "
             "model's generation_config.json, 'vllm' (or 'pagoda') uses the engine's own defaults, a folder "
             "takes its generation_config.json",
    )
    # SUPPRESS: given after `serve`, it overrides the top-level --log-level; absent, it leaves it.
    parser.add_argument("--log-level", default=argparse.SUPPRESS, choices=["debug", "info", "warning", "error"],
                        help="how much to log (default: info)")
    parser.add_argument("--disable-log-requests", action="store_true", help="no log line per request")
    # CORS, as vLLM: any origin, method and header, but no credentials unless asked for.
    parser.add_argument("--allowed-origins", type=json.loads, default=["*"], help='CORS origins, a JSON list: ["*"]')
    parser.add_argument("--allow-credentials", action="store_true",
                        help="let browsers send cookies and auth headers cross-origin (CORS credentials; off by default)")
    parser.add_argument("--allowed-methods", type=json.loads, default=["*"], help='CORS methods, a JSON list: ["*"]')
    parser.add_argument("--allowed-headers", type=json.loads, default=["*"], help='CORS headers, a JSON list: ["*"]')
    parser.add_argument(
        "--max-queued-requests", type=int, default=None,
        help="answer new requests with 503 and Retry-After while this many engine requests (each prompt and each "
             "of n) wait to be scheduled (SGLang's flag; default: no bound)",
    )
    add_response_arguments(parser)
    add_request_limit_arguments(parser)


def add_response_arguments(parser: argparse.ArgumentParser) -> None:
    """vLLM's flags for what responses carry and which extra endpoints the server has."""
    parser.add_argument("--return-tokens-as-token-ids", action="store_true",
                        help="write logprob tokens as 'token_id:N' (a request's return_tokens_as_token_ids overrides)")
    parser.add_argument("--enable-prompt-tokens-details", action="store_true",
                        help="report usage.prompt_tokens_details.cached_tokens: the prompt tokens the prefix cache served")
    parser.add_argument("--enable-force-include-usage", action="store_true",
                        help="put usage in every streamed chunk and a usage chunk at the end, whatever stream_options say")
    parser.add_argument("--enable-tokenizer-info-endpoint", action="store_true",
                        help="serve GET /tokenizer_info (the tokenizer's configuration and chat template)")
    parser.add_argument("--enable-server-load-tracking", action="store_true",
                        help="count the generation requests in flight, reported by GET /load")


def model_argument(args: argparse.Namespace) -> str | None:
    """The model to serve: the positional argument, else --model."""
    return args.model_tag or args.model


def add_request_limit_arguments(parser: argparse.ArgumentParser) -> None:
    """How much of the server one request may take (RequestLimits)."""
    defaults = RequestLimits()
    parser.add_argument("--trust-request-chat-template", action="store_true",
                        help="accept a request's own `chat_template` (it runs on the server); without this flag "
                             "such requests are refused with a 400, as in vLLM")
    parser.add_argument("--chat-template-timeout", type=float, default=defaults.chat_template_timeout,
                        help="seconds a chat template may take to render one request's messages before the "
                             "request gets a 400 (default: %(default)s)")
    parser.add_argument("--max-request-body-size", type=int, default=defaults.max_request_body_size,
                        help="largest request body in bytes; larger ones get a 413 (default: %(default)s, 16 MiB)")
    parser.add_argument("--request-body-timeout", type=float, default=defaults.request_body_timeout,
                        help="seconds a request's body may take to arrive after its headers before the "
                             "request gets a 408 and its connection is closed (default: %(default)s)")


def request_limits(args: argparse.Namespace) -> RequestLimits:
    return RequestLimits(
        max_request_body_size=args.max_request_body_size, request_body_timeout=args.request_body_timeout,
        chat_template_timeout=args.chat_template_timeout,
        trust_request_chat_template=args.trust_request_chat_template,
    )
