"""The FastAPI app, its routes (the OpenAI API; the chat playground unless disabled) and error
handlers, and `pagoda serve` (uvicorn around an AsyncLLM, on a port bound before the engine
starts: startup.py answers 503 there meanwhile)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import gc
import importlib
import inspect
import logging
import os
import secrets
import signal
import socket
import ssl
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import uvicorn
from uvicorn.config import SSL_PROTOCOL_VERSION, create_ssl_context
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException

import pagoda
from pagoda.config import EngineConfig
from pagoda.engine.async_llm import AsyncLLM, EngineDeadError, RequestAborted
from pagoda.entrypoints.chat_utils import load_chat_template

from .cli_args import model_argument, request_limits
from .metrics import log_stats, metrics_registry
from .playground import add_playground_routes
from .preprocess import tokenize_prompt
from .protocol import (
    ChatCompletionRequest, ClassificationRequest, CompletionRequest, DetokenizeRequest, EmbeddingRequest,
    ErrorResponse, ModelCard, ModelList, RerankRequest, ScoreRequest, TokenizeRequest,
)
from .protocol_responses import ResponsesRequest
from .request_body import RequestBodyLimits
from .request_id import RequestIdHeaders
from .response_store import ResponseStore
from .serving_chat import OpenAIServingChat, adds_generation_prompt
from .serving_completion import OpenAIServingCompletion
from .serving_embedding import OpenAIServingEmbedding
from .serving_score import OpenAIServingScore
from .serving_responses import OpenAIServingResponses
from .serving_engine import OpenAIError, ServerConfig, as_openai_error
from .startup import StartingResponder, StartupClock
from .serving_lora import add_lora_routes, lora_model_cards, serve_lora_modules
from .tool_parsers import ToolParser, get_tool_parser, import_tool_parser_plugin
from .tokenizer_info import tokenizer_info

logger = logging.getLogger("pagoda.server")

# Seconds uvicorn waits for open connections after SIGINT/SIGTERM; in-flight requests are aborted
# at once, so their responses end well within it.
_GRACEFUL_SHUTDOWN_S = 3

# What the POST routes answer besides 200, for /openapi.json: an invalid request is a 400 in
# OpenAI's error shape (not FastAPI's 422), as is every other error.
_ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "Invalid request: `param` names the offending field"},
    "default": {"model": ErrorResponse, "description": "Error"},
}


# /invocations reads its body itself (to dispatch on it); /openapi.json still says what it takes.
_INVOCATIONS_BODY = {"requestBody": {"required": True, "content": {"application/json": {"schema": {"anyOf": [
    {"$ref": f"#/components/schemas/{model.__name__}"} for model in (ChatCompletionRequest, CompletionRequest)
]}}}}}


@dataclasses.dataclass
class CorsConfig:
    """vLLM's --allowed-origins, --allow-credentials, --allowed-methods, --allowed-headers."""

    allowed_origins: list[str] = dataclasses.field(default_factory=lambda: ["*"])
    allow_credentials: bool = False
    allowed_methods: list[str] = dataclasses.field(default_factory=lambda: ["*"])
    allowed_headers: list[str] = dataclasses.field(default_factory=lambda: ["*"])


@dataclasses.dataclass
class Endpoints:
    """vLLM's switches for the server's optional endpoints and where a proxy serves it."""

    root_path: str | None = None  # --root-path
    tokenizer_info: bool = False  # --enable-tokenizer-info-endpoint
    server_load_tracking: bool = False  # --enable-server-load-tracking
    request_id_headers: bool = False  # --enable-request-id-headers
    fastapi_docs: bool = True  # /docs, /redoc and /openapi.json; off with --disable-fastapi-docs


class ServerLoad:
    """vLLM's server load (GET /load): generation requests in flight, counted only with
    --enable-server-load-tracking; a stream counts until it ends."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.in_flight = 0

    def enter(self) -> None:
        self.in_flight += self.enabled

    def leave(self) -> None:
        self.in_flight -= self.enabled

    def until_done(self, chunks: AsyncIterator[str]) -> AsyncIterator[str]:
        """The stream, counted until it ends; as it is when not tracking (a layer less per chunk)."""
        return self._counted(chunks) if self.enabled else chunks

    async def _counted(self, chunks: AsyncIterator[str]) -> AsyncIterator[str]:
        try:
            async for chunk in chunks:
                yield chunk
        finally:
            self.leave()


def build_app(
    engine: AsyncLLM, config: ServerConfig, api_keys: Sequence[str] | None = None, cors: CorsConfig | None = None,
    endpoints: Endpoints | None = None, playground: bool = True, stats_log: bool = True,
    middleware: Sequence[Any] = (),
) -> FastAPI:
    """stats_log: a stats line every $PAGODA_LOG_STATS_INTERVAL seconds (10) while there is traffic;
    middleware: --middleware's classes and functions (import_middleware)."""
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        interval = float(os.environ.get("PAGODA_LOG_STATS_INTERVAL", 10))
        stats_task = asyncio.create_task(log_stats(engine, interval)) if stats_log else None
        yield
        if stats_task is not None:
            stats_task.cancel()
        await responses.shutdown()  # background responses would otherwise hold the shutdown

    endpoints = endpoints or Endpoints()
    docs = endpoints.fastapi_docs
    app = FastAPI(
        title="Pagoda", version=pagoda.__version__, lifespan=lifespan, root_path=endpoints.root_path or "",
        docs_url="/docs" if docs else None, redoc_url="/redoc" if docs else None,
        openapi_url="/openapi.json" if docs else None,
    )
    # Added first, so it runs inside CORS (its 413/408 carry CORS headers) and after the key check.
    app.add_middleware(
        RequestBodyLimits, max_size=config.limits.max_request_body_size, timeout=config.limits.request_body_timeout
    )
    cors = cors or CorsConfig()
    app.add_middleware(CORSMiddleware, allow_origins=cors.allowed_origins, allow_credentials=cors.allow_credentials,
                       allow_methods=cors.allowed_methods, allow_headers=cors.allowed_headers)
    if api_keys:
        app.middleware("http")(_require_api_key(api_keys))
    if endpoints.request_id_headers:  # outside the others: refusals carry the id too
        app.add_middleware(RequestIdHeaders)
    for added in middleware:  # outermost, as vLLM adds them
        if inspect.isclass(added):
            app.add_middleware(added)
        else:
            app.middleware("http")(added)
    _add_error_handlers(app)
    responses = _add_routes(app, engine, config, endpoints)
    if playground:
        add_playground_routes(app)
    return app


def _add_routes(
    app: FastAPI, engine: AsyncLLM, config: ServerConfig, endpoints: Endpoints
) -> OpenAIServingResponses:
    """The routes; returns the Responses API's handler, whose background responses the app stops."""
    completions = OpenAIServingCompletion(engine, config)
    chat = OpenAIServingChat(engine, config)
    embeddings = OpenAIServingEmbedding(engine, config)
    scores = OpenAIServingScore(engine, config)
    responses = OpenAIServingResponses(
        chat, ResponseStore(config.max_stored_responses, config.stored_response_ttl)
    )
    registry = metrics_registry(engine, config.served_model_names[0], config.metrics_vllm_names)
    load = ServerLoad(endpoints.server_load_tracking)

    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=200 if engine.is_alive() else 503)

    # SageMaker's health check, beside its /invocations (vLLM serves both methods); /health's alias,
    # left out of /openapi.json.
    app.add_api_route("/ping", health, methods=["GET", "POST"], include_in_schema=False)

    @app.get("/version")
    async def version() -> dict[str, str]:
        return {"version": pagoda.__version__}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    def model_cards() -> list[ModelCard]:
        served = [ModelCard(id=name, root=name, max_model_len=config.max_model_len) for name in config.served_model_names]
        return served + lora_model_cards(config)

    @app.get("/v1/models")
    async def models() -> ModelList:
        return ModelList(data=model_cards())

    @app.get("/v1/models/{model_id:path}", responses=_ERROR_RESPONSES)  # OpenAI's retrieve; ids may hold "/"
    async def model(model_id: str) -> ModelCard:
        card = next((card for card in model_cards() if card.id == model_id), None)
        if card is None:
            raise OpenAIError(f"The model `{model_id}` does not exist", 404, "model", code="model_not_found")
        return card

    @app.post("/v1/completions", responses=_ERROR_RESPONSES)
    async def create_completion(body: CompletionRequest, raw: Request) -> Any:
        return await _respond(raw, completions.create(body), load)

    @app.post("/v1/chat/completions", responses=_ERROR_RESPONSES)
    async def create_chat_completion(body: ChatCompletionRequest, raw: Request) -> Any:
        return await _respond(raw, chat.create(body), load)

    @app.post("/v1/embeddings", responses=_ERROR_RESPONSES)
    async def create_embedding(body: EmbeddingRequest, raw: Request) -> Any:
        return await _respond(raw, embeddings.create(body), load)

    # vLLM's scoring routes, each under its paths.
    @app.post("/score", responses=_ERROR_RESPONSES)
    @app.post("/v1/score", responses=_ERROR_RESPONSES)
    async def create_score(body: ScoreRequest, raw: Request) -> Any:
        return await _respond(raw, scores.score(body), load)

    @app.post("/rerank", responses=_ERROR_RESPONSES)
    @app.post("/v1/rerank", responses=_ERROR_RESPONSES)
    @app.post("/v2/rerank", responses=_ERROR_RESPONSES)
    async def do_rerank(body: RerankRequest, raw: Request) -> Any:
        return await _respond(raw, scores.rerank(body), load)

    @app.post("/classify", responses=_ERROR_RESPONSES)
    async def create_classify(body: ClassificationRequest, raw: Request) -> Any:
        return await _respond(raw, scores.classify(body), load)

    @app.post("/invocations", responses=_ERROR_RESPONSES, openapi_extra=_INVOCATIONS_BODY)
    async def invocations(raw: Request) -> Any:
        """SageMaker's route, as vLLM serves it: a body with messages is a chat completion, one
        with a prompt a completion."""
        body = await _json_body(raw)
        if isinstance(body, dict) and "messages" in body:
            return await create_chat_completion(_validated(ChatCompletionRequest, body), raw)
        if isinstance(body, dict) and "prompt" in body:
            return await create_completion(_validated(CompletionRequest, body), raw)
        raise OpenAIError(
            "Cannot find suitable handler for request. Expected one of: ['ChatCompletionRequest', "
            "'CompletionRequest'] (a body with `messages` or with `prompt`)"
        )

    @app.get("/load")
    async def server_load() -> dict[str, int]:
        return {"server_load": load.in_flight}

    @app.post("/v1/responses", responses=_ERROR_RESPONSES)
    async def create_response(body: ResponsesRequest, raw: Request) -> Any:
        return await _respond(raw, responses.create(body), load)

    @app.get("/v1/responses/{response_id}", responses=_ERROR_RESPONSES)
    async def retrieve_response(response_id: str, stream: bool = False, starting_after: int | None = None) -> Any:
        retrieved = responses.retrieve(response_id, stream, starting_after)
        if isinstance(retrieved, BaseModel):
            return JSONResponse(retrieved.model_dump(exclude_none=True))
        return StreamingResponse(retrieved, media_type="text/event-stream")

    @app.post("/v1/responses/{response_id}/cancel", responses=_ERROR_RESPONSES)
    async def cancel_response(response_id: str) -> Any:
        return JSONResponse((await responses.cancel(response_id)).model_dump(exclude_none=True))

    @app.delete("/v1/responses/{response_id}", responses=_ERROR_RESPONSES)
    async def delete_response(response_id: str) -> dict[str, Any]:
        return (await responses.delete(response_id)).model_dump()

    add_lora_routes(app, engine, config, _ERROR_RESPONSES)

    @app.post("/tokenize", responses=_ERROR_RESPONSES)
    async def tokenize(body: TokenizeRequest) -> dict[str, Any]:
        return await _tokenize(chat, body)

    if endpoints.tokenizer_info:
        @app.get("/tokenizer_info")
        async def get_tokenizer_info() -> dict[str, Any]:
            return tokenizer_info(chat.require_tokenizer(), config.chat_template)

    @app.post("/detokenize", responses=_ERROR_RESPONSES)
    async def detokenize(body: DetokenizeRequest) -> dict[str, Any]:
        chat.check_model(body.model)
        bad = [t for t in body.tokens if not 0 <= t < engine.vocab_size]
        if bad:
            raise OpenAIError(f"token ids {bad[:5]} are out of the vocabulary range", param="tokens")
        return {"prompt": chat.require_tokenizer().decode(body.tokens)}

    return responses


async def _tokenize(chat: OpenAIServingChat, body: TokenizeRequest) -> dict[str, Any]:
    """The prompt's tokens, counted off the event loop; one far beyond the context is refused as
    for generation (this route needs no API key: it must not be a way to tie up the server)."""
    chat.check_model(body.model)
    if (body.prompt is None) == (body.messages is None):
        raise OpenAIError("give exactly one of prompt and messages", param="prompt")
    if body.messages is not None:
        tools = [tool.model_dump(exclude_none=True) for tool in body.tools] if body.tools else None
        # As vLLM's: a conversation's template has its special tokens; the tokenizer's are added on request only.
        add_special = body.add_special_tokens and "add_special_tokens" in body.model_fields_set
        _, tokens, _ = await chat.render(
            body.messages, body.chat_template, adds_generation_prompt(body), body.continue_final_message,
            body.chat_template_kwargs, tools, add_special, length_limit=chat.config.max_model_len,
        )
    else:
        tokens = await tokenize_prompt(
            chat.require_tokenizer(), body.prompt, body.add_special_tokens, chat.config.max_model_len, "prompt"
        )
    response: dict[str, Any] = {"count": len(tokens), "max_model_len": chat.config.max_model_len, "tokens": tokens}
    if body.return_token_strs:
        response["token_strs"] = chat.require_tokenizer().convert_ids_to_tokens(tokens)
    return response


async def _json_body(raw: Request) -> Any:
    try:
        return await raw.json()
    except ValueError as error:  # JSONDecodeError, UnicodeDecodeError
        raise OpenAIError(f"the request body is not valid JSON: {error}") from None


def _validated(model: type[BaseModel], body: dict[str, Any]) -> Any:
    """The body as model, or the 400 naming the field that FastAPI's own validation would give."""
    try:
        return model.model_validate(body)
    except ValidationError as error:
        raise RequestValidationError(error.errors()) from None


async def _respond(raw: Request, created: Awaitable[BaseModel | AsyncIterator[str]], load: ServerLoad) -> Any:
    """A whole response, or an SSE stream. A client that leaves before a whole response is ready
    cancels it (which aborts its requests); a stream is cancelled by Starlette itself."""
    load.enter()
    streaming = False
    try:
        handler = asyncio.ensure_future(created)
        watcher = asyncio.ensure_future(_disconnected(raw))
        await asyncio.wait({handler, watcher}, return_when=asyncio.FIRST_COMPLETED)
        watcher.cancel()
        if not handler.done():
            handler.cancel()
            await asyncio.gather(handler, return_exceptions=True)
            return Response(status_code=499)  # nginx's "client closed request": nobody reads it
        result = handler.result()
        if isinstance(result, BaseModel):
            return JSONResponse(result.model_dump(exclude_none=True))
        streaming = True
        return StreamingResponse(load.until_done(result), media_type="text/event-stream")
    finally:
        if not streaming:
            load.leave()


async def _disconnected(raw: Request) -> None:
    while (await raw.receive())["type"] != "http.disconnect":
        pass


def _require_api_key(api_keys: Sequence[str]) -> Callable:
    """Any one of the keys (vLLM's --api-key takes several, so that keys can be rotated)."""
    expected = [f"Bearer {key}".encode() for key in api_keys]

    async def check(request: Request, call_next: Callable) -> Response:
        # OpenAI's routes (and /invocations, which generates too) need the key; /health, /metrics
        # etc. stay open for probes, as in vLLM.
        given = request.headers.get("authorization", "")
        path = _route_path(request)
        protected = path.startswith("/v1") or path == "/invocations"
        # Compared with each key in constant time, all of them: how long it takes says nothing.
        matches = [secrets.compare_digest(given.encode(), key) for key in expected]
        if protected and request.method != "OPTIONS" and not any(matches):
            return _error(OpenAIError("invalid or missing API key", 401, code="invalid_api_key"))
        return await call_next(request)

    return check


def _route_path(request: Request) -> str:
    """The path the routes see: a request may come with --root-path's prefix or without it (a
    proxy that strips it)."""
    path, root = request.scope["path"], request.scope.get("root_path", "")
    return path[len(root):] if root and path.startswith(root) else path


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(OpenAIError)
    async def openai_error(_: Request, error: OpenAIError) -> JSONResponse:
        return _error(error)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, error: RequestValidationError) -> JSONResponse:
        return _error(validation_error(error.errors()))

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, error: HTTPException) -> JSONResponse:
        return _error(OpenAIError(str(error.detail), error.status_code))

    # A handler of its own class answers inside the app: one for Exception answers from outermost
    # middleware, which then re-raises, and the server drops the connection (a keep-alive client's too).
    @app.exception_handler(RequestAborted)
    @app.exception_handler(RecursionError)
    @app.exception_handler(Exception)
    async def failed(_: Request, error: Exception) -> JSONResponse:
        return _error(as_openai_error(error))


def validation_error(errors: Sequence[Any]) -> OpenAIError:
    """A request body's validation errors (pydantic's, FastAPI's) as a 400 naming the first field."""
    first = errors[0]
    if first.get("type") == "json_invalid":
        return OpenAIError(f"the request body is not valid JSON: {first.get('msg')}")
    # A union (prompt) reports one error per branch: a value out of range says more than the
    # branches whose type did not match.
    first = next((e for e in errors if not str(e.get("type", "")).endswith("_type")), first)
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    if not loc:
        return OpenAIError(f"the request body is invalid: {first.get('msg')}")
    # The top-level field names the parameter (deeper parts can be pydantic's names of union branches).
    return OpenAIError(f"{'.'.join(loc)}: {first.get('msg')}", param=loc[0])


def _error(error: OpenAIError) -> JSONResponse:
    return JSONResponse(error.response().model_dump(), status_code=error.status, headers=error.headers)


# `pagoda serve` -----------------------------------------------------------------------------


class _Server(uvicorn.Server):
    """uvicorn, plus: a signal aborts every in-flight request at once, a served SIGTERM or SIGINT
    is a clean exit (uvicorn itself re-raises the signal, so the status would be nonzero), and the
    engine's death shuts the server down (as vLLM's does), to exit nonzero."""

    def __init__(self, config: uvicorn.Config, engine: AsyncLLM) -> None:
        super().__init__(config)
        self.engine = engine
        self.engine_died = False
        engine.dead_listeners.append(self.on_engine_death)

    def on_engine_death(self, error: EngineDeadError) -> None:
        logger.error("shutting the server down: %s", error)
        self.engine_died = True
        self.should_exit = True  # uvicorn's main loop reads it, from any thread

    def handle_exit(self, sig: int, frame: Any) -> None:
        super().handle_exit(sig, frame)
        self.engine.abort()

    @contextlib.contextmanager
    def capture_signals(self) -> Any:
        originals = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in originals.items():
                signal.signal(sig, handler)


def auto_tool_parser(args: argparse.Namespace) -> type[ToolParser] | None:
    """The parser of "auto" tool calls: --tool-call-parser, once --enable-auto-tool-choice is set
    (a --tool-parser-plugin file may add parsers first); checked before the engine starts."""
    if args.tool_parser_plugin:
        import_tool_parser_plugin(args.tool_parser_plugin)
    if args.enable_auto_tool_choice and not args.tool_call_parser:
        raise ValueError("--enable-auto-tool-choice requires --tool-call-parser")
    parser = get_tool_parser(args.tool_call_parser) if args.tool_call_parser else None
    return parser if args.enable_auto_tool_choice else None


def import_middleware(paths: list[str]) -> list[Any]:
    """--middleware's objects: each module.name a class (ASGI middleware) or a coroutine function
    (HTTP middleware, as app.middleware("http") takes it); imported before the engine starts, so
    that a bad path fails at once."""
    imported = []
    for path in paths:
        module_name, _, name = path.rpartition(".")
        if not module_name:
            raise ValueError(f"--middleware {path}: give the import path of a class or function, as module.name")
        try:
            added = getattr(importlib.import_module(module_name), name)
        except (ImportError, AttributeError) as error:
            raise ValueError(f"--middleware {path}: cannot import it: {error}") from None
        if not (inspect.isclass(added) or inspect.iscoroutinefunction(added)):
            kind = type(added).__name__
            raise ValueError(f"--middleware {path}: it is a {kind}, not a class or a coroutine function")
        imported.append(added)
    return imported


def engine_server_config(engine: AsyncLLM, served_model_names: list[str], **options: Any) -> ServerConfig:
    """A ServerConfig whose engine-given fields (the context, the default sampling parameters, the
    pooling) come from `engine`, for the server and run-batch alike; options: the other fields."""
    model = engine.config.model
    return ServerConfig(
        served_model_names=served_model_names, max_model_len=engine.max_model_len,
        default_sampling=model.default_sampling, max_tokens_cap=model.max_tokens_cap, pooler=model.pooler, **options,
    )


def tls_context(args: argparse.Namespace) -> ssl.SSLContext | None:
    """The TLS context of --ssl-certfile (with --ssl-keyfile, --ssl-ca-certs, --ssl-cert-reqs), as
    uvicorn makes it for the app: the start-up 503s are answered over TLS too, and a bad file fails
    before the engine loads. None without a certificate."""
    if args.ssl_certfile is None:
        if args.ssl_keyfile is not None:
            raise ValueError("--ssl-keyfile needs --ssl-certfile: the certificate the key belongs to")
        return None
    try:
        return create_ssl_context(
            certfile=args.ssl_certfile, keyfile=args.ssl_keyfile, password=None, ssl_version=SSL_PROTOCOL_VERSION,
            cert_reqs=args.ssl_cert_reqs, ca_certs=args.ssl_ca_certs, ciphers="TLSv1",  # uvicorn's default
        )
    except (OSError, ssl.SSLError) as error:
        raise ValueError(f"--ssl-certfile {args.ssl_certfile} / --ssl-keyfile {args.ssl_keyfile}: {error}") from None


def server_url(args: argparse.Namespace, host: str | None = None) -> str:
    """Where the server listens, for its log: unix:PATH, or http(s)://host:port."""
    if args.uds:
        return f"unix:{args.uds}"
    scheme = "https" if args.ssl_certfile else "http"
    return f"{scheme}://{host or args.host or '0.0.0.0'}:{args.port}"


def run_server(args: argparse.Namespace, listener: socket.socket, engine_config: EngineConfig) -> None:
    """Serve on `listener`, bound to --host/--port before anything slow: 503 there until the
    engine (of `engine_config`, the server's flags) is ready, then uvicorn."""
    clock = StartupClock()
    # What the front end reads of its own is checked before the engine loads: a bad argument fails at once.
    tool_parser = auto_tool_parser(args)
    middleware = import_middleware(args.middleware)
    chat_template = load_chat_template(args.chat_template)
    starting = StartingResponder(listener, tls_context(args))
    clock.lap("front end", f": listening on {server_url(args)}, answering 503 until the engine is ready")
    model = model_argument(args)
    engine = AsyncLLM(engine_config, server=True)
    clock.lap("engine start", " (its tokenizer, weights, profiling and graph capture are logged above)")
    try:  # from here on, a failure stops the engine in order rather than leaving it to be killed at exit
        names = args.served_model_name or [model or engine.model_name]
        config = engine_server_config(
            engine, names,
            chat_template=chat_template, chat_template_content_format=args.chat_template_content_format,
            log_requests=not args.disable_log_requests, max_log_len=args.max_log_len,
            response_role=args.response_role,
            limits=request_limits(args),
            max_queued_requests=args.max_queued_requests, metrics_vllm_names=args.metrics_vllm_names,
            reasoning_parser=args.reasoning_parser,
            max_stored_responses=args.max_stored_responses, stored_response_ttl=args.stored_response_ttl,
            tool_parser=tool_parser,
            return_tokens_as_token_ids=args.return_tokens_as_token_ids,
            enable_prompt_tokens_details=args.enable_prompt_tokens_details,
            enable_force_include_usage=args.enable_force_include_usage,
        )
        serve_lora_modules(engine, config.loras, args.lora_modules or [], names[0])
        cors = CorsConfig(args.allowed_origins, args.allow_credentials, args.allowed_methods, args.allowed_headers)
        endpoints = Endpoints(
            args.root_path, args.enable_tokenizer_info_endpoint, args.enable_server_load_tracking,
            args.enable_request_id_headers, not args.disable_fastapi_docs,
        )
        app = build_app(
            engine, config, args.api_key, cors, endpoints, playground=not args.disable_playground,
            stats_log=not args.disable_log_stats, middleware=middleware,
        )
        uvicorn_config = uvicorn.Config(
            app, host=args.host or "0.0.0.0", port=args.port, uds=args.uds,
            log_level=args.uvicorn_log_level or logging.getLogger().getEffectiveLevel(),
            access_log=not args.disable_uvicorn_access_log, timeout_graceful_shutdown=_GRACEFUL_SHUTDOWN_S,
            ssl_keyfile=args.ssl_keyfile, ssl_certfile=args.ssl_certfile, ssl_ca_certs=args.ssl_ca_certs,
            ssl_cert_reqs=args.ssl_cert_reqs,
        )
        logger.info("serving %s on %s", names, server_url(args))
        if not args.disable_playground:
            logger.info("chat playground: %s/", server_url(args, "localhost"))
        server = _Server(uvicorn_config, engine)
        clock.lap("app")
        logger.info("start-up: %s", clock.summary())
        server.run(sockets=[starting.hand_over()])
    finally:
        engine.shutdown()
    # The interpreter's last collection would walk the whole heap (torch, transformers) for
    # seconds on a busy host; the process is ending, so nothing needs freeing.
    gc.freeze()
    if server.engine_died:
        sys.exit(1)
