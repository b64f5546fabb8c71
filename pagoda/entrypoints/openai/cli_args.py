"""`pagoda serve`'s and `pagoda run-batch`'s flags, named as vLLM's."""

from __future__ import annotations

import argparse
import json
import os
import ssl
from typing import Any

from pagoda.entrypoints.chat_utils import CONTENT_FORMATS
from pagoda.entrypoints.engine_args import add_engine_arguments, engine_kwargs
from pagoda.entrypoints.openai.limits import RequestLimits
from pagoda.entrypoints.openai.reasoning import REASONING_PARSERS


def _port(text: str) -> int:
    port = int(text) if text.strip().isdigit() else -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a TCP port: ports go from 0 (any free one) to 65535")
    return port


def _non_negative(text: str) -> int:
    if not text.strip().isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of 0 or more")
    return int(text)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # As vLLM: the model positional, or --model (the positional wins when both are given).
    parser.add_argument("model_tag", nargs="?", default=None, metavar="model",
                        help="a local HF directory, a GGUF file or a cached model id (default: the embedded model)")
    parser.add_argument("--host", default=None, help="address to listen on (default: all interfaces)")
    parser.add_argument("--port", type=_port, default=8000, help="port to listen on (default: %(default)s)")
    parser.add_argument("--uds", default=None, metavar="PATH",
                        help="listen on this Unix domain socket instead of --host/--port")
    parser.add_argument("--ssl-certfile", default=None, help="serve HTTPS with this certificate (PEM)")
    parser.add_argument("--ssl-keyfile", default=None, help="the certificate's private key (PEM), unless the "
                        "certificate file holds it")
    parser.add_argument("--ssl-ca-certs", default=None, help="CA certificates that client certificates are checked "
                        "against (with --ssl-cert-reqs)")
    parser.add_argument("--ssl-cert-reqs", type=int, default=int(ssl.CERT_NONE),
                        help="whether clients must show a certificate: 0 none, 1 optional, 2 required "
                             "(Python's ssl.CERT_*; default: %(default)s)")
    parser.add_argument("--served-model-name", nargs="+", default=None,
                        help="the name(s) clients use in `model` (default: the model argument)")
    env_key = os.environ.get("PAGODA_API_KEY") or os.environ.get("VLLM_API_KEY")
    parser.add_argument("--api-key", nargs="+", default=[env_key] if env_key else None, metavar="KEY",
                        help="require `Authorization: Bearer KEY` on /v1, one of these keys (default: $PAGODA_API_KEY, "
                             "else $VLLM_API_KEY)")
    parser.add_argument("--root-path", default=None,
                        help="the path prefix a proxy serves this server under (FastAPI's root_path), e.g. /llm")
    # data_parallel_size is a server knob, not an engine one: offline LLM is one engine core.
    add_engine_arguments(parser, skip=())
    parser.add_argument("--chat-template", default=None, help="a Jinja file, or the template itself")
    parser.add_argument(
        "--chat-template-content-format", choices=CONTENT_FORMATS, default="auto",
        help="how a message's content reaches the chat template: 'string' (text parts joined), 'openai' (a list "
             "of parts, for templates that loop over them), 'auto' (as the template's source shows; the default)",
    )
    # SUPPRESS: given after `serve`, it overrides the top-level --log-level; absent, it leaves it.
    parser.add_argument("--log-level", default=argparse.SUPPRESS, choices=["debug", "info", "warning", "error"],
                        help="how much to log (default: info)")
    parser.add_argument("--disable-playground", action="store_true",
                        help="do not serve the chat playground page at / and /playground")
    parser.add_argument("--disable-log-requests", action="store_true", help="no log line per request")
    parser.add_argument("--enable-log-requests", dest="disable_log_requests", action="store_false",
                        help="a log line per request (the default here; vLLM's newer spelling)")
    parser.add_argument("--max-log-len", type=_non_negative, default=None, metavar="N",
                        help="cut the prompt text and token ids a request's log line shows (at debug level) to "
                             "N characters and N ids (default: no limit)")
    parser.add_argument("--disable-log-stats", action="store_true",
                        help="no stats line every 10 s ($PAGODA_LOG_STATS_INTERVAL) while there is traffic")
    parser.add_argument("--uvicorn-log-level", default=None,
                        choices=["critical", "error", "warning", "info", "debug", "trace"],
                        help="the HTTP server's own logging (default: as --log-level)")
    parser.add_argument("--disable-uvicorn-access-log", action="store_true", help="no log line per HTTP request")
    # CORS, as vLLM: any origin, method and header, but no credentials unless asked for.
    parser.add_argument("--allowed-origins", type=json.loads, default=["*"], help='CORS origins, a JSON list: ["*"]')
    parser.add_argument("--allow-credentials", action="store_true",
                        help="let browsers send cookies and auth headers cross-origin (CORS credentials; off by default)")
    parser.add_argument("--allowed-methods", type=json.loads, default=["*"], help='CORS methods, a JSON list: ["*"]')
    parser.add_argument("--allowed-headers", type=json.loads, default=["*"], help='CORS headers, a JSON list: ["*"]')
    parser.add_argument("--middleware", action="append", default=[], metavar="IMPORT.PATH",
                        help="an ASGI middleware class or an HTTP middleware coroutine function (module.name) added "
                             "to the app; repeatable")
    parser.add_argument(
        "--max-queued-requests", type=int, default=None,
        help="answer new requests with 503 and Retry-After while this many engine requests (each prompt and each "
             "of n) wait to be scheduled (SGLang's flag; default: no bound)",
    )
    parser.add_argument("--metrics-vllm-names", action="store_true",
                        help="/metrics also exports every pagoda: metric under vLLM's vllm: name, so that Grafana "
                             "dashboards and alerts made for vLLM work unchanged")
    parser.add_argument(
        "--reasoning-parser", choices=REASONING_PARSERS, default=None,
        help="split a reasoning model's thinking (<think>...</think>) from its answer: chat replies carry it as "
             "reasoning_content, /v1/responses as a reasoning item (vLLM's parsers; default: none)",
    )
    parser.add_argument("--max-stored-responses", type=int, default=1000,
                        help="how many /v1/responses responses are kept in memory for previous_response_id and "
                             "GET /v1/responses/{id}; the oldest go first, 0 keeps none (default: %(default)s)")
    parser.add_argument("--stored-response-ttl", type=float, default=3600.0,
                        help="seconds a stored /v1/responses response is kept (default: %(default)s)")
    parser.add_argument(
        "--lora-modules", nargs="+", default=None, metavar="NAME=PATH",
        help='LoRA adapters (PEFT folders) served by name, with --enable-lora: name=path, or JSON '
             '{"name": ..., "path": ..., "base_model_name": ...}; a request picks one by its `model`',
    )
    add_tool_calling_arguments(parser)
    add_response_arguments(parser)
    add_request_limit_arguments(parser)


def add_tool_calling_arguments(parser: argparse.ArgumentParser) -> None:
    """vLLM's flags for reading tool calls out of a model's replies."""
    parser.add_argument("--enable-auto-tool-choice", action="store_true",
                        help='let the model decide when to call tools (tool_choice "auto", the default with '
                             "tools); needs --tool-call-parser")
    parser.add_argument("--tool-call-parser", default=None, metavar="NAME",
                        help="the model's tool-call format: hermes, llama3_json, mistral, or a name a "
                             "--tool-parser-plugin registers")
    parser.add_argument("--tool-parser-plugin", default=None, metavar="FILE",
                        help="a Python file that registers more tool-call parsers (with "
                             "pagoda.entrypoints.openai.tool_parsers.register_tool_parser)")


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
    parser.add_argument("--enable-request-id-headers", action="store_true",
                        help="an X-Request-Id header on every response: the request's own, or a new one")
    parser.add_argument("--enable-server-load-tracking", action="store_true",
                        help="count the generation requests in flight, reported by GET /load")
    parser.add_argument("--disable-fastapi-docs", action="store_true",
                        help="do not serve /docs, /redoc and /openapi.json")
    parser.add_argument("--response-role", default="assistant", metavar="ROLE",
                        help="the role of chat replies to requests with add_generation_prompt (default: %(default)s)")


def model_argument(args: argparse.Namespace) -> str | None:
    """The model to serve: the positional argument, else --model."""
    return args.model_tag or args.model


def server_engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The EngineConfig of `pagoda serve`: its flags (the server's own defaults, its step budget
    among them, are resolved with the model: config/resolve.py)."""
    return {**engine_kwargs(args), "model": model_argument(args)}


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


def add_run_batch_arguments(parser: argparse.ArgumentParser) -> None:
    """`pagoda run-batch`: vLLM's run_batch flags (the files, --model and the engine's)."""
    parser.add_argument("-i", "--input-file", required=True,
                        help="the requests: one JSON object a line, in OpenAI's batch input format")
    parser.add_argument("-o", "--output-file", required=True,
                        help="where the results go: one JSON object a line, in the input's order")
    add_engine_arguments(parser, skip=())
