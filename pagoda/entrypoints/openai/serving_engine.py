"""What the completion, chat and pooling (embedding, score, classify) handlers share: errors in
OpenAI's shape, model, runner and pooling-task checks, the SamplingParams of a request, prompt
truncation and the context-length check, the queue bound (--max-queued-requests), running one
engine request, a beam search (use_beam_search) or prompts on the embedding engine, usage (with
its cached-token details and stream options) and logprob tokens as text or as "token_id:N"."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import re
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from pagoda.beam_search import MAX_BEAM_WIDTH, BeamSearch, BeamSearchParams, completion_outputs
from pagoda.engine.async_llm import AsyncLLM, RequestAborted
from pagoda.engine.input_processor import truncate_prompt
from pagoda.lora.registry import ServedLoRAs
from pagoda.lora.request import LoRARequest
from pagoda.outputs import RequestOutput
from pagoda.pooling import PoolerConfig, check_task
from pagoda.sampling_params import SamplingParams

from .limits import RequestLimits
from .protocol import (
    ErrorInfo, ErrorResponse, LogprobInfo, PromptLogprobs, PromptTokenUsageInfo, SamplingFields,
    StreamOptions, UsageInfo,
)
from .tool_parsers import ToolParser

logger = logging.getLogger("pagoda.server")

_PARAM_IN_MESSAGE = re.compile(r"^(\w+)=")
# Seconds a client refused for a full queue is asked to wait: the queue's time to drain is not
# known, and one second spreads the retries without idling a server that has caught up.
_RETRY_AFTER_S = 1


class OpenAIError(Exception):
    """An error the client caused (or may retry): becomes {"error": {...}} with this status."""

    def __init__(
        self, message: str, status: int = 400, param: str | None = None,
        type: str = "invalid_request_error", code: str | None = None, headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.param, self.type, self.code = status, param, type, code
        self.headers = headers  # of the error response (Retry-After)

    def response(self) -> ErrorResponse:
        return ErrorResponse(error=ErrorInfo(message=str(self), type=self.type, param=self.param, code=self.code))


def value_error(error: ValueError, default_param: str | None = None) -> OpenAIError:
    """A SamplingParams / engine ValueError as a 400 naming the parameter it starts with."""
    match = _PARAM_IN_MESSAGE.match(str(error))
    return OpenAIError(str(error), param=match.group(1) if match else default_param)


def refuse_unsupported(fields: dict[str, Any]) -> None:
    """400 for the first OpenAI field set whose feature is not built."""
    for name, value in fields.items():
        if value is not None:
            raise OpenAIError(f"'{name}' is not supported by this server yet", param=name, code="unsupported_parameter")


@dataclass
class ServerConfig:
    served_model_names: list[str]
    max_model_len: int
    chat_template: str | None
    log_requests: bool
    # SamplingParams fields a request leaves unset take these (--generation-config).
    default_sampling: dict[str, Any] = dataclasses.field(default_factory=dict)
    max_tokens_cap: int | None = None  # ModelConfig.max_tokens_cap
    limits: RequestLimits = dataclasses.field(default_factory=RequestLimits)
    # New requests get a 503 while this many engine requests wait (--max-queued-requests).
    max_queued_requests: int | None = None
    # /metrics also under vLLM's vllm: names (--metrics-vllm-names).
    metrics_vllm_names: bool = False
    # Chat replies split into reasoning_content and content (--reasoning-parser).
    reasoning_parser: str | None = None
    # POST /v1/responses keeps this many responses, each for this many seconds (--max-stored-responses,
    # --stored-response-ttl).
    max_stored_responses: int = 1000
    stored_response_ttl: float = 3600.0
    # Reads tool calls out of replies to "auto" tool_choice (--enable-auto-tool-choice, --tool-call-parser).
    tool_parser: type[ToolParser] | None = None
    # vLLM's flags of the same names.
    return_tokens_as_token_ids: bool = False
    enable_prompt_tokens_details: bool = False
    enable_force_include_usage: bool = False
    # An embedding server's pooling (--runner pooling): it serves /v1/embeddings and no generation.
    pooler: PoolerConfig | None = None
    # The LoRA adapters a request's `model` may name besides the served names (--lora-modules).
    loras: ServedLoRAs = dataclasses.field(default_factory=ServedLoRAs)
    # The prompt text and token ids a request's log line shows, cut to this many characters and
    # ids (--max-log-len; None: whole).
    max_log_len: int | None = None
    # How message content reaches the chat template (--chat-template-content-format).
    chat_template_content_format: str = "auto"
    # The role of a reply that opens a new turn (--response-role).
    response_role: str = "assistant"


class OpenAIServing:
    # The request field that holds the prompt, named by errors about its length.
    prompt_param = "prompt"
    # The runner (--runner) whose engine this route's requests need.
    runner = "generate"
    # SamplingParams' names of fields this route's requests call otherwise (for errors).
    param_names: dict[str, str] = {}

    def __init__(self, engine: AsyncLLM, config: ServerConfig) -> None:
        self.engine = engine
        self.config = config
        self.tokenizer = engine.tokenizer

    @property
    def model_name(self) -> str:
        return self.config.served_model_names[0]

    def check_model(self, model: str | None) -> LoRARequest | None:
        """The LoRA adapter `model` names (None: the base model); 404 for a name not served."""
        if model is None or model in self.config.served_model_names:
            return None
        lora = self.config.loras.get(model)
        if lora is None:
            raise OpenAIError(
                f"The model `{model}` does not exist; this server serves "
                f"{self.config.served_model_names + list(self.config.loras.by_name)}",
                status=404, param="model", code="model_not_found",
            )
        return lora

    def response_model(self, model: str | None) -> str:
        """What a response's `model` says: the adapter's name for a request that named one (as
        vLLM answers), else the served model's."""
        return model if model is not None and self.config.loras.get(model) is not None else self.model_name

    def check_runner(self) -> None:
        """400 when the engine runs the other runner (embeddings on a generating model, or the reverse)."""
        runner = "generate" if self.config.pooler is None else "pooling"
        if runner != self.runner:
            raise OpenAIError(
                f"The model `{self.model_name}` does not support this API: it needs a server started with "
                f"--runner {self.runner}, and this one runs --runner {runner}",
                param="model",
            )

    def check_pooling_task(self, task: str) -> PoolerConfig:
        """The embedding server's pooling, when its model serves `task` (embed, classify or
        score); else a 400 naming the model."""
        self.check_runner()
        pooler = self.config.pooler
        assert pooler is not None  # check_runner: a pooling server
        try:
            check_task(pooler, task, self.model_name)
        except ValueError as error:
            raise OpenAIError(str(error), param="model") from None
        return pooler

    def require_tokenizer(self) -> Any:
        if self.tokenizer is None:
            raise OpenAIError("this model was loaded without a tokenizer", param="prompt")
        return self.tokenizer

    def value_error(self, error: ValueError, default_param: str | None = None) -> OpenAIError:
        """value_error, naming the parameter as this route's requests name it."""
        openai_error = value_error(error, default_param)
        openai_error.param = self.param_names.get(openai_error.param, openai_error.param)
        return openai_error

    def length_limit(self, request: Any) -> int | None:
        """The context a text prompt is checked against before it is tokenized whole (a text far
        past it is refused early); None when the request's truncate_prompt_tokens cuts it anyway."""
        return None if request.truncate_prompt_tokens is not None else self.config.max_model_len

    def truncate(self, request: SamplingFields, prompt_token_ids: list[int]) -> list[int]:
        """The prompt as truncate_prompt_tokens leaves it (the engine would truncate it the same
        way; the context-length check must see what it will run)."""
        try:
            return truncate_prompt(prompt_token_ids, request.truncate_prompt_tokens, self.config.max_model_len)
        except ValueError as error:
            raise self.value_error(error) from None

    def sampling_params(
        self, request: SamplingFields, max_tokens: int | None, prompt_len: int, logprobs: int | None, **extra: Any
    ) -> SamplingParams:
        """The request's SamplingParams; max_tokens None means the rest of the context; extra
        overrides fields."""
        limit = self.config.max_model_len
        if request.stream_options is not None and not request.stream:
            raise OpenAIError("stream_options is only allowed when stream is true", param="stream_options")
        if request.stream and request.prompt_logprobs is not None:
            raise OpenAIError("prompt_logprobs are not available when stream is true", param="prompt_logprobs")
        completion = max_tokens if max_tokens is not None else 1
        if prompt_len + completion > limit:
            # OpenAI names the prompt's field: the prompt is what a client shortens.
            what = self.prompt_param
            raise OpenAIError(
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{prompt_len + completion} tokens ({prompt_len} in the {what}, {completion} for the completion). "
                f"Please reduce the length of the {what} or completion.",
                param=what, code="context_length_exceeded",
            )
        fields = dict(
            n=request.n, temperature=request.temperature, top_p=request.top_p, top_k=request.top_k,
            min_p=request.min_p, repetition_penalty=request.repetition_penalty,
            presence_penalty=request.presence_penalty, frequency_penalty=request.frequency_penalty,
            seed=request.seed, stop=request.stop, stop_token_ids=request.stop_token_ids,
            include_stop_str_in_output=request.include_stop_str_in_output, ignore_eos=request.ignore_eos,
            max_tokens=max_tokens if max_tokens is not None else max(1, limit - prompt_len),
            min_tokens=request.min_tokens, logprobs=logprobs, prompt_logprobs=request.prompt_logprobs,
            logit_bias=request.logit_bias, skip_special_tokens=request.skip_special_tokens,
            spaces_between_special_tokens=request.spaces_between_special_tokens,
            allowed_token_ids=request.allowed_token_ids, truncate_prompt_tokens=request.truncate_prompt_tokens,
            bad_words=request.bad_words,
        )
        fields.update(extra)
        for name, value in self.config.default_sampling.items():
            if name == "max_tokens" and max_tokens is None:
                fields[name] = min(value, fields[name])  # never past the context
            elif fields.get(name) is None:
                fields[name] = value
        if self.config.max_tokens_cap is not None:
            fields["max_tokens"] = min(fields["max_tokens"], self.config.max_tokens_cap)
        try:
            # Unset fields take SamplingParams' own defaults.
            return SamplingParams(**{k: v for k, v in fields.items() if v is not None})
        except ValueError as error:
            raise self.value_error(error) from None

    async def add_requests(
        self, request_id: str, prompts: list[tuple[str | None, list[int]]], params: list[SamplingParams],
        default_param: str, lora_request: LoRARequest | None = None, images: Sequence[Any] = (),
        cache_salt: str | None = None, priority: int = 0, token_type_ids: Sequence[list[int] | None] = (),
    ) -> list[AsyncIterator[RequestOutput]]:
        """Add one engine request per prompt, all or none (a refusal is a 400, a full queue a 503); returns their
        output streams. images: each prompt's images (a chat's one prompt has them); token_type_ids: each
        prompt's, or () for none. The caller aborts sub_request_ids(request_id, len(prompts)) when done:
        a stream never iterated cannot abort its own request."""
        self.check_runner()
        self.refuse_when_queue_full()
        streams: list[AsyncIterator[RequestOutput]] = []
        ids = sub_request_ids(request_id, len(prompts))
        try:
            for i, (sub_id, (text, token_ids), p) in enumerate(zip(ids, prompts, params)):
                if self.config.log_requests:
                    self._log_request(sub_id, text, token_ids, p, len(images))
                streams.append(await self.engine.add_request(
                    sub_id, token_ids, p, text, lora_request, images, cache_salt, priority,
                    token_type_ids=token_type_ids[i] if token_type_ids else None,
                ))
        except BaseException as error:
            self.engine.abort(ids[: len(streams)])
            if isinstance(error, ValueError):
                raise self.value_error(error, default_param) from None
            raise
        return streams

    def _log_request(
        self, request_id: str, text: str | None, token_ids: list[int], params: SamplingParams, num_images: int
    ) -> None:
        """The request's log line; at debug level, as vLLM's, its prompt too (cut to --max-log-len)."""
        if logger.isEnabledFor(logging.DEBUG):
            cut = self.config.max_log_len  # None slices whole
            logger.debug("Request %s details: prompt: %r, prompt_token_ids: %s", request_id, text and text[:cut],
                         token_ids[:cut])
        logger.info("Received request %s: %d prompt tokens%s, params: %s", request_id, len(token_ids),
                    f" and {num_images} images" if num_images else "", params_summary(params))

    async def pooled_outputs(
        self, prefix: str, prompts: list[tuple[str | None, list[int]]], default_param: str,
        token_type_ids: Sequence[list[int] | None] = (),
    ) -> tuple[str, list[RequestOutput]]:
        """Run each prompt on the embedding engine: the request's id (from prefix) and each
        prompt's final output (its pooled vector), in prompt order."""
        request_id = new_request_id(prefix)
        # One prefill step and no sampling: max_tokens only has to leave the prompt room.
        params = SamplingParams(max_tokens=1, detokenize=False)
        streams = await self.add_requests(
            request_id, prompts, [params] * len(prompts), default_param, token_type_ids=token_type_ids
        )
        try:
            finals: dict[int, RequestOutput] = {}
            async for index, output in merge(streams):
                finals[index] = output
        finally:
            self.engine.abort(sub_request_ids(request_id, len(prompts)))
        return request_id, [finals[i] for i in range(len(prompts))]

    def beam_searches(
        self, request: SamplingFields, ids: list[str], prompts: list[tuple[str | None, list[int]]],
        max_tokens: list[int], width: int, width_param: str, lora_request: LoRARequest | None,
    ) -> list[AsyncIterator[RequestOutput]]:
        """vLLM's use_beam_search: one search of `width` beams per prompt, each an output stream of
        one final output, the request's n best beams (text and deltas whole)."""
        if lora_request is not None:
            raise OpenAIError("use_beam_search is not supported with a LoRA adapter yet", param="use_beam_search")
        if width > MAX_BEAM_WIDTH:
            raise OpenAIError(
                f"{width_param}={width} is invalid: the beam width must be at most {MAX_BEAM_WIDTH}", param=width_param
            )
        self.check_runner()
        self.refuse_when_queue_full()
        try:
            params = [
                BeamSearchParams(width, tokens, request.ignore_eos, request.temperature or 0.0, request.length_penalty)
                for tokens in max_tokens
            ]
        except ValueError as error:
            raise value_error(error) from None
        n, extra = request.n or 1, {"cache_salt": request.cache_salt, "priority": request.priority}
        return [self._beam_search(sub_id, prompt, p, n, extra) for sub_id, prompt, p in zip(ids, prompts, params)]

    async def _beam_search(
        self, request_id: str, prompt: tuple[str | None, list[int]], params: BeamSearchParams, num_returned: int,
        extra: dict[str, Any],
    ) -> AsyncIterator[RequestOutput]:
        text, token_ids = prompt
        search = BeamSearch(token_ids, params, self.engine.processor.config.model.eos_token_ids)
        step_params = params.step_params()
        while not search.done:
            finals = await asyncio.gather(*(
                self._final_output(f"{request_id}-{search.steps}-{i}", beam.tokens, step_params, extra)
                for i, beam in enumerate(search.live)
            ))
            search.advance([o.outputs[0].logprobs[0] if o.outputs[0].logprobs else None for o in finals])
        outputs = completion_outputs(search, search.best()[:num_returned], self.tokenizer)
        yield RequestOutput(request_id, text, token_ids, None, outputs, finished=True)

    async def _final_output(
        self, request_id: str, token_ids: list[int], params: SamplingParams, extra: dict[str, Any]
    ) -> RequestOutput:
        """One beam's step: extra holds the request's cache_salt and priority."""
        output = None
        try:
            stream = await self.engine.add_request(request_id, token_ids, params, **extra)
        except ValueError as error:  # the prompt is refused
            raise value_error(error, self.prompt_param) from None
        async for output in stream:
            pass
        assert output is not None and output.finished  # the stream ends with the final output
        return output

    def usage(self, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> UsageInfo:
        """Usage; with --enable-prompt-tokens-details, the prompt tokens the prefix cache served
        (when any did, as vLLM reports them)."""
        details = None
        if self.config.enable_prompt_tokens_details and cached_tokens:
            details = PromptTokenUsageInfo(cached_tokens=cached_tokens)
        return UsageInfo(
            prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens, prompt_tokens_details=details,
        )

    def stream_usage(self, options: StreamOptions | None) -> tuple[bool, bool]:
        """(a usage chunk at the end, usage in every chunk), as vLLM decides them:
        --enable-force-include-usage gives both; continuous_usage_stats needs include_usage."""
        if self.config.enable_force_include_usage:
            return True, True
        include = bool(options and options.include_usage)
        return include, include and bool(options and options.continuous_usage_stats)

    def token_text(self, request: SamplingFields, decoded: str | None, token_id: int) -> str:
        """A logprob's token as text; "token_id:N", as vLLM writes it, when the request (or else
        --return-tokens-as-token-ids) asks for ids, or the server has no tokenizer
        (--skip-tokenizer-init), so that the tokens of a top-logprobs map stay apart."""
        as_ids = request.return_tokens_as_token_ids
        if as_ids is None:
            as_ids = self.config.return_tokens_as_token_ids
        return f"token_id:{token_id}" if as_ids or decoded is None else decoded

    def refuse_when_queue_full(self) -> None:
        bound = self.config.max_queued_requests
        if bound is not None and self.engine.num_waiting >= bound:
            raise OpenAIError(
                f"The request queue is full ({bound} requests waiting, --max-queued-requests); retry later.",
                503, type="server_error", headers={"Retry-After": str(_RETRY_AFTER_S)},
            )


def params_summary(params: SamplingParams) -> str:
    """The fields that differ from SamplingParams' defaults, for the request log line."""
    defaults = SamplingParams()
    return ", ".join(
        f"{f.name}={getattr(params, f.name)!r}" for f in dataclasses.fields(params)
        if getattr(params, f.name) != getattr(defaults, f.name)
    )


def prompt_logprobs(request: SamplingFields, output: RequestOutput) -> PromptLogprobs | None:
    """vLLM's prompt_logprobs field, when the request asked for it."""
    if request.prompt_logprobs is None or output.prompt_logprobs is None:
        return None
    return [
        None if position is None else {
            token_id: LogprobInfo(logprob=lp.logprob, rank=lp.rank, decoded_token=lp.decoded_token)
            for token_id, lp in position.items()
        }
        for position in output.prompt_logprobs
    ]


def new_request_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def sub_request_ids(request_id: str, num_prompts: int) -> list[str]:
    return [f"{request_id}-{i}" for i in range(num_prompts)]


def sse(payload: BaseModel, exclude_none: bool = True) -> str:
    return f"data: {payload.model_dump_json(exclude_none=exclude_none)}\n\n"


SSE_DONE = "data: [DONE]\n\n"


async def sse_stream(chunks: AsyncIterator[str], engine: AsyncLLM, request_ids: list[str]) -> AsyncIterator[str]:
    """An SSE body: the chunks, then [DONE]. An error once streaming has begun can no longer change
    the status, so it goes out as an error event, shaped as a whole error response (param and
    code included, null or not); the requests are aborted however it ends."""
    try:
        async for chunk in chunks:
            yield chunk
    except Exception as error:
        yield sse(as_openai_error(error).response(), exclude_none=False)
    finally:
        engine.abort(request_ids)
    yield SSE_DONE


def as_openai_error(error: Exception) -> OpenAIError:
    """Any exception as the error a client gets: a request the engine aborted (shutting down) is
    a 503 it may retry; a request whose JSON nests past Python's recursion limit (a tool's or a
    schema's parameters copied, rendered or walked) is the client's 400; anything else is a bug: a
    500 naming only its type (the traceback is logged)."""
    if isinstance(error, OpenAIError):
        return error
    if isinstance(error, RequestAborted):
        return OpenAIError(str(error), 503, type="server_error")
    if isinstance(error, RecursionError):
        return OpenAIError("the request nests too deeply to be processed (maximum recursion depth exceeded)")
    logger.error("internal error", exc_info=error)
    return OpenAIError(f"internal server error: {type(error).__name__}", 500, type="server_error")


async def merge(iterators: list[AsyncIterator[Any]]) -> AsyncIterator[tuple[int, Any]]:
    """Items of several async iterators as they come, tagged with the iterator's index; if one
    fails or the consumer leaves, the others are cancelled (which aborts their requests)."""
    if len(iterators) == 1:  # most requests: no task and no queue between the stream and its reader
        only = iterators[0]
        try:
            async for item in only:
                yield 0, item
        finally:
            await only.aclose()  # type: ignore[attr-defined]  # an async generator: closing it aborts its request
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def drain(index: int, iterator: AsyncIterator[Any]) -> None:
        try:
            async for item in iterator:
                await queue.put((index, item))
            await queue.put((index, done))
        except BaseException as error:  # handed to the consumer, which re-raises it
            await queue.put((index, error))

    tasks = [asyncio.create_task(drain(i, it)) for i, it in enumerate(iterators)]
    try:
        remaining = len(tasks)
        while remaining:
            index, item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
