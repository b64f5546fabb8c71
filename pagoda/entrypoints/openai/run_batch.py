"""`pagoda run-batch -i requests.jsonl -o results.jsonl`: OpenAI's batch file format run offline,
as vLLM's run_batch. Each input line {"custom_id", "method": "POST", "url": "/v1/chat/completions",
"/v1/completions", or "/v1/embeddings", "/v1/score" and "/v1/rerank" (an engine with --runner
pooling), "body"} gets one output line {"id", "custom_id", "response": {"status_code",
"request_id", "body"}, "error"}, in input order. The lines run concurrently through the server's
own handlers on an in-process AsyncLLM; a line that cannot be read, or whose request is refused,
gets an error (status code and OpenAI's error object) and the other lines go on."""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ValidationError
from tqdm.auto import tqdm

from pagoda.config import EngineConfig
from pagoda.engine.async_llm import AsyncLLM
from pagoda.entrypoints.engine_args import engine_kwargs

from .protocol import ChatCompletionRequest, CompletionRequest, EmbeddingRequest, ErrorInfo, RerankRequest, ScoreRequest
from .server import engine_server_config, validation_error
from .serving_chat import OpenAIServingChat
from .serving_completion import OpenAIServingCompletion
from .serving_embedding import OpenAIServingEmbedding
from .serving_engine import OpenAIError, as_openai_error, new_request_id
from .serving_score import OpenAIServingScore

Handler = Callable[[Any], Awaitable[Any]]


class BatchRequestInput(BaseModel):
    custom_id: str
    method: Literal["POST"]
    url: Literal["/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/score", "/v1/rerank"]
    body: dict[str, Any]


class BatchResponseData(BaseModel):
    status_code: int
    request_id: str
    body: dict[str, Any] | None = None  # the response; None when the request failed


class BatchRequestOutput(BaseModel):
    id: str
    custom_id: str | None
    response: BatchResponseData
    error: ErrorInfo | None = None


def main(args: argparse.Namespace) -> None:
    """Run the input file's requests; args: cli_args.add_run_batch_arguments'."""
    lines = [line for line in Path(args.input_file).read_text().splitlines() if line.strip()]
    engine = AsyncLLM(EngineConfig(**engine_kwargs(args)))
    try:
        config = engine_server_config(
            engine, [args.model or engine.model_name], chat_template=None, log_requests=False
        )
        scores = OpenAIServingScore(engine, config)
        handlers: dict[str, tuple[type[BaseModel], Handler]] = {
            "/v1/chat/completions": (ChatCompletionRequest, OpenAIServingChat(engine, config).create),
            "/v1/completions": (CompletionRequest, OpenAIServingCompletion(engine, config).create),
            "/v1/embeddings": (EmbeddingRequest, OpenAIServingEmbedding(engine, config).create),
            "/v1/score": (ScoreRequest, scores.score),
            "/v1/rerank": (RerankRequest, scores.rerank),
        }
        results = asyncio.run(_run_all(lines, handlers))
    finally:
        engine.shutdown()
    Path(args.output_file).write_text("".join(result.model_dump_json() + "\n" for result in results))


async def _run_all(lines: list[str], handlers: dict[str, tuple[type[BaseModel], Handler]]) -> list[BatchRequestOutput]:
    with tqdm(total=len(lines), desc="Running batch", unit="req") as progress:
        async def run(line: str) -> BatchRequestOutput:
            result = await _run_line(line, handlers)
            progress.update()
            return result

        return await asyncio.gather(*(run(line) for line in lines))


async def _run_line(line: str, handlers: dict[str, tuple[type[BaseModel], Handler]]) -> BatchRequestOutput:
    try:
        item = BatchRequestInput.model_validate_json(line)
    except ValidationError as error:
        return _failed(_custom_id(line), _line_error(error))
    body_type, handler = handlers[item.url]
    try:
        body = body_type.model_validate(item.body)
        if getattr(body, "stream", False):  # embeddings have no stream field
            raise OpenAIError("stream is not available in a batch file", param="stream")
        response = await handler(body)
    except ValidationError as error:
        return _failed(item.custom_id, validation_error(error.errors()))
    except Exception as error:
        return _failed(item.custom_id, as_openai_error(error))
    return BatchRequestOutput(
        id=new_request_id("pagoda"), custom_id=item.custom_id,
        response=BatchResponseData(status_code=200, request_id=new_request_id("pagoda-batch"),
                                   body=response.model_dump(exclude_none=True)),
    )


def _line_error(error: ValidationError) -> OpenAIError:
    first = error.errors()[0]
    if first.get("type") == "json_invalid":
        return OpenAIError(f"the line is not valid JSON: {first.get('msg')}")
    return validation_error(error.errors())


def _custom_id(line: str) -> str | None:
    """The custom_id of a line that is not a valid request, if it has one."""
    try:
        custom_id = json.loads(line).get("custom_id")
    except (ValueError, AttributeError):
        return None
    return custom_id if isinstance(custom_id, str) else None


def _failed(custom_id: str | None, error: OpenAIError) -> BatchRequestOutput:
    return BatchRequestOutput(
        id=new_request_id("pagoda"), custom_id=custom_id,
        response=BatchResponseData(status_code=error.status, request_id=new_request_id("pagoda-batch")),
        error=error.response().error,
    )
