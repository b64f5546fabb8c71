"""POST /v1/completions: one engine request per prompt, whole or streamed as SSE chunks (with
token ids and usage in them when asked for); with use_beam_search, one beam search per prompt
(pagoda/beam_search.py), its result one output."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator

from pagoda.engine.detokenizer import decode_token
from pagoda.outputs import CompletionOutput, PositionLogprobs, RequestOutput

from .preprocess import Prompt, prompt_inputs
from .protocol import (
    CompletionChoice, CompletionLogprobs, CompletionRequest, CompletionResponse, CompletionStreamChoice,
    CompletionStreamResponse,
)
from .serving_engine import (
    OpenAIError, OpenAIServing, merge, new_request_id, prompt_logprobs, refuse_unsupported, sse, sse_stream,
    sub_request_ids,
)
from .structured_outputs import structured_outputs


class OpenAIServingCompletion(OpenAIServing):
    async def create(self, request: CompletionRequest) -> CompletionResponse | AsyncIterator[str]:
        lora = self.check_model(request.model)
        refuse_unsupported({
            "suffix": request.suffix,
            "best_of": None if request.use_beam_search or request.best_of in (None, 1, request.n) else request.best_of,
        })
        texts = await self._prompts(request)
        prompts = [self._truncated(request, text, ids) for text, ids in texts]
        # Echoed prompt tokens get logprobs too.
        prompt_k = request.prompt_logprobs
        if prompt_k is None and request.echo:
            prompt_k = request.logprobs
        constraint = await structured_outputs(request)
        # vLLM's echo without generation: max_tokens 0 with echo answers with the prompt alone and
        # its logprobs (how evaluation harnesses score a text); one token is computed and dropped.
        echo_only = bool(request.echo) and request.max_tokens == 0
        params = [
            self.sampling_params(
                request, 1 if echo_only else request.max_tokens, len(ids), request.logprobs, prompt_logprobs=prompt_k,
                structured_outputs=constraint,
            )
            for _, ids in prompts
        ]
        request_id = new_request_id("cmpl")
        ids = sub_request_ids(request_id, len(prompts))
        if request.use_beam_search:
            width, width_param = _beam_width(request)
            max_tokens = [p.max_tokens for p in params]
            streams = self.beam_searches(request, ids, prompts, max_tokens, width, width_param, lora)
        else:
            streams = await self.add_requests(
                request_id, prompts, params, default_param="prompt", lora_request=lora, cache_salt=request.cache_salt,
                priority=request.priority,
            )
        if echo_only:
            streams = [_without_generated(stream) for stream in streams]
        if request.stream:
            return sse_stream(self._stream(request, request_id, prompts, streams), self.engine, ids)
        try:
            return await self._full(request, request_id, prompts, streams)
        finally:
            self.engine.abort(ids)

    def _truncated(self, request: CompletionRequest, text: str | None, ids: list[int]) -> Prompt:
        """The prompt as truncate_prompt_tokens leaves it; a cut prompt's text is its tokens' (echo)."""
        kept = self.truncate(request, ids)
        return (text if len(kept) == len(ids) else None), kept
    async def _prompts(self, request: CompletionRequest) -> list[Prompt]:
        limit = self.length_limit(request)
        return await prompt_inputs(request.prompt, "prompt", self.require_tokenizer, limit, request.add_special_tokens)

    async def _full(
        self, request: CompletionRequest, request_id: str, prompts: list[Prompt], streams: list[AsyncIterator]
    ) -> CompletionResponse:
        finals: dict[int, RequestOutput] = {}
        async for index, output in merge(streams):
            finals[index] = output
        choices, completion_tokens = [], 0
        for index, (text, ids) in enumerate(prompts):
            output = finals[index]
            for child in output.outputs:
                completion_tokens += len(child.token_ids)
                echo = self._echo_text(text, ids) if request.echo else ""
                choices.append(CompletionChoice(
                    index=index * len(output.outputs) + child.index, text=echo + child.text,
                    logprobs=self._logprobs(request, output, child, 0, len(child.token_ids), 0),
                    finish_reason=child.finish_reason, stop_reason=child.stop_reason,
                    prompt_logprobs=prompt_logprobs(request, output),
                    **self._token_ids(request, ids, child.token_ids),
                ))
        prompt_tokens = sum(len(ids) for _, ids in prompts)
        cached = sum(output.num_cached_tokens for output in finals.values())
        return CompletionResponse(
            id=request_id, model=self.response_model(request.model), choices=choices,
            usage=self.usage(prompt_tokens, completion_tokens, cached),
        )

    @staticmethod
    def _token_ids(request: CompletionRequest, prompt_ids: list[int] | None, output_ids: list[int]) -> dict:
        """return_token_ids' fields of a choice (prompt_ids None: not this chunk's to carry)."""
        if not request.return_token_ids:
            return {}
        return {"prompt_token_ids": prompt_ids, "token_ids": output_ids}

    async def _stream(
        self, request: CompletionRequest, request_id: str, prompts: list[Prompt], streams: list[AsyncIterator]
    ) -> AsyncIterator[str]:
        sent: dict[tuple[int, int], int] = {}  # (prompt, child) -> output tokens already sent
        text_sent: dict[tuple[int, int], int] = {}  # characters sent, for logprobs' text_offset
        completion_tokens = 0
        cached: dict[int, int] = {}  # prompt -> its tokens the prefix cache served
        prompt_tokens = sum(len(ids) for _, ids in prompts)
        include_usage, continuous_usage = self.stream_usage(request.stream_options)
        async for index, output in merge(streams):
            cached[index] = output.num_cached_tokens
            choices = []
            for child in output.outputs:
                key = (index, child.index)
                start = sent.get(key)
                first = start is None
                text = child.text_delta
                if first and request.echo:
                    text = self._echo_text(*prompts[index]) + text
                start = start or 0
                new_tokens = len(child.token_ids) - start
                if not text and new_tokens == 0 and child.finish_reason is None:
                    continue
                sent[key] = len(child.token_ids)
                offset = text_sent.get(key, 0)
                text_sent[key] = offset + len(text)
                completion_tokens += new_tokens
                choices.append(CompletionStreamChoice(
                    index=index * len(output.outputs) + child.index, text=text,
                    logprobs=self._logprobs(request, output, child, start, len(child.token_ids), offset),
                    finish_reason=child.finish_reason, stop_reason=child.stop_reason,
                    **self._token_ids(request, prompts[index][1] if first else None, child.token_ids[start:]),
                ))
            if choices:
                usage = self.usage(prompt_tokens, completion_tokens, sum(cached.values())) if continuous_usage else None
                model = self.response_model(request.model)
                yield sse(CompletionStreamResponse(id=request_id, model=model, choices=choices, usage=usage))
        if include_usage:
            yield sse(CompletionStreamResponse(
                id=request_id, model=self.response_model(request.model), choices=[],
                usage=self.usage(prompt_tokens, completion_tokens, sum(cached.values())),
            ))

    def _echo_text(self, text: str | None, ids: list[int]) -> str:
        return text if text is not None else self.require_tokenizer().decode(ids)

    def _logprobs(
        self, request: CompletionRequest, output: RequestOutput, child: CompletionOutput, start: int, end: int,
        text_offset: int,
    ) -> CompletionLogprobs | None:
        """OpenAI's logprobs of output tokens [start, end), after the prompt's when echoing."""
        if request.logprobs is None or child.logprobs is None:
            return None
        token_ids = child.token_ids[start:end]
        positions: list[PositionLogprobs | None] = list(child.logprobs[start:end])
        if request.echo and start == 0 and output.prompt_logprobs is not None:
            token_ids = output.prompt_token_ids + token_ids
            positions = output.prompt_logprobs + positions
        result = CompletionLogprobs()
        for token_id, position in zip(token_ids, positions):
            chosen = position.get(token_id) if position else None
            # The first prompt token has no logprobs, but still its text.
            decoded = chosen.decoded_token if chosen else decode_token(self.require_tokenizer(), token_id) or ""
            token = self.token_text(request, decoded, token_id)
            result.tokens.append(token)
            result.token_logprobs.append(chosen.logprob if chosen else None)
            result.top_logprobs.append(
                {self.token_text(request, lp.decoded_token, i): lp.logprob for i, lp in position.items()}
                if position else None
            )
            result.text_offset.append(text_offset)
            text_offset += len(token or "")
        return result


def _beam_width(request: CompletionRequest) -> tuple[int, str]:
    """use_beam_search's beam width (best_of, else n) and the field that sets it."""
    n = request.n or 1
    if request.best_of is None:
        return n, "n"
    if request.best_of < n:
        raise OpenAIError(f"best_of={request.best_of} is invalid: it must be >= n ({n})", param="best_of")
    return request.best_of, "best_of"


async def _without_generated(stream: AsyncIterator[RequestOutput]) -> AsyncIterator[RequestOutput]:
    """The outputs with each choice's generated tokens, text and logprobs taken out."""
    async for output in stream:
        output.outputs = [
            dataclasses.replace(c, text="", text_delta="", token_ids=[], logprobs=None if c.logprobs is None else [])
            for c in output.outputs
        ]
        yield output
