"""POST /v1/chat/completions: messages through the chat template, one engine request (n choices)."""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator
from typing import Any

import jinja2

from pagoda.entrypoints.chat_utils import ADD_SPECIAL_TOKENS_TO_RENDERED, Conversation, render_chat_text
from pagoda.outputs import CompletionOutput, PositionLogprobs

from .preprocess import DeadlineExceeded, run_with_deadline, tokenize_prompt
from .protocol import (
    ChatChoice, ChatCompletionChunk, ChatCompletionRequest, ChatCompletionResponse, ChatLogprobs, ChatMessage,
    ChatResponseMessage, ChatStreamChoice, DeltaMessage, TokenLogprob, TopLogprob,
)
from .serving_engine import (
    OpenAIError, OpenAIServing, merge, new_request_id, prompt_logprobs, refuse_unsupported, sse, sse_stream,
    sub_request_ids, usage,
)
from .structured_outputs import structured_outputs

# Roles the chat templates know; "developer" is OpenAI's newer name for "system".
_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


class OpenAIServingChat(OpenAIServing):
    async def create(self, request: ChatCompletionRequest) -> ChatCompletionResponse | AsyncIterator[str]:
        self.check_model(request.model)
        _refuse_unsupported(request)
        if request.chat_template is not None and not self.config.limits.trust_request_chat_template:
            raise OpenAIError(
                "Chat template is passed with request, but --trust-request-chat-template is not set. "
                "Refused request with untrusted chat template.", param="chat_template",
            )
        prompt_text, prompt_ids = await self.render(
            request.messages, request.chat_template, request.add_generation_prompt
        )
        if request.top_logprobs is not None and not request.logprobs:
            raise OpenAIError("top_logprobs needs logprobs set to true", param="top_logprobs")
        logprobs = (request.top_logprobs or 0) if request.logprobs else None
        max_tokens = request.max_completion_tokens if request.max_completion_tokens is not None else request.max_tokens
        params = self.sampling_params(
            request, max_tokens, len(prompt_ids), logprobs, structured_outputs=structured_outputs(request)
        )
        request_id = new_request_id("chatcmpl")
        streams = await self.add_requests(request_id, [(prompt_text, prompt_ids)], [params], "messages")
        ids = sub_request_ids(request_id, 1)
        if request.stream:
            chunks = self._stream(request, request_id, len(prompt_ids), params.n, streams[0])
            return sse_stream(chunks, self.engine, ids)
        try:
            return await self._full(request, request_id, len(prompt_ids), streams[0])
        finally:
            self.engine.abort(ids)

    async def render(
        self, messages: list[ChatMessage], chat_template: str | None, add_generation_prompt: bool
    ) -> tuple[str, list[int]]:
        """The prompt of a conversation, rendered and tokenized off the event loop; a template that
        rejects it (e.g. roles that do not alternate) or runs past the server's time bound, or a
        prompt far beyond the context, is the client's error."""
        conversation = _conversation(messages)
        tokenizer = self.require_tokenizer()
        render = functools.partial(
            render_chat_text, tokenizer, conversation, chat_template or self.config.chat_template, add_generation_prompt
        )
        bound = self.config.limits.chat_template_timeout
        try:
            text = await run_with_deadline(render, bound, "pagoda-chat-template")
        except DeadlineExceeded:
            raise OpenAIError(
                f"the chat template took longer than {bound:g} s (--chat-template-timeout) to render these messages",
                param="chat_template" if chat_template is not None else "messages",
            ) from None
        except (jinja2.TemplateError, ValueError) as error:
            raise OpenAIError(f"the chat template cannot render these messages: {error}", param="messages") from None
        limit = self.config.max_model_len
        return text, await tokenize_prompt(tokenizer, text, ADD_SPECIAL_TOKENS_TO_RENDERED, limit, "messages")

    async def _full(
        self, request: ChatCompletionRequest, request_id: str, prompt_tokens: int, stream: AsyncIterator
    ) -> ChatCompletionResponse:
        final = None
        async for _, output in merge([stream]):
            final = output
        choices = [
            ChatChoice(
                index=child.index, message=ChatResponseMessage(content=child.text),
                logprobs=self._logprobs(request, child, 0), finish_reason=child.finish_reason,
                stop_reason=child.stop_reason,
            )
            for child in final.outputs
        ]
        completion_tokens = sum(len(c.token_ids) for c in final.outputs)
        return ChatCompletionResponse(
            id=request_id, model=self.model_name, choices=choices, usage=usage(prompt_tokens, completion_tokens),
            prompt_logprobs=prompt_logprobs(request, final),
        )

    async def _stream(
        self, request: ChatCompletionRequest, request_id: str, prompt_tokens: int, n: int, stream: AsyncIterator
    ) -> AsyncIterator[str]:
        sent = [0] * n  # output tokens already sent, per choice
        # OpenAI opens each choice with the role, before any content.
        yield self._chunk(request_id, [
            ChatStreamChoice(index=i, delta=DeltaMessage(role="assistant", content="")) for i in range(n)
        ])
        async for _, output in merge([stream]):
            choices = [self._stream_choice(request, child, sent) for child in output.outputs]
            choices = [c for c in choices if c is not None]
            if choices:
                yield self._chunk(request_id, choices)
        if request.stream_options and request.stream_options.include_usage:
            chunk = ChatCompletionChunk(
                id=request_id, model=self.model_name, choices=[], usage=usage(prompt_tokens, sum(sent))
            )
            yield sse(chunk)

    def _stream_choice(
        self, request: ChatCompletionRequest, child: CompletionOutput, sent: list[int]
    ) -> ChatStreamChoice | None:
        start = sent[child.index]
        if not child.text_delta and len(child.token_ids) == start and child.finish_reason is None:
            return None
        sent[child.index] = len(child.token_ids)
        return ChatStreamChoice(
            index=child.index, delta=DeltaMessage(content=child.text_delta),
            logprobs=self._logprobs(request, child, start), finish_reason=child.finish_reason,
            stop_reason=child.stop_reason,
        )

    def _chunk(self, request_id: str, choices: list[ChatStreamChoice]) -> str:
        return sse(ChatCompletionChunk(id=request_id, model=self.model_name, choices=choices))

    def _logprobs(self, request: ChatCompletionRequest, child: CompletionOutput, start: int) -> ChatLogprobs | None:
        if not request.logprobs or child.logprobs is None:
            return None
        top = request.top_logprobs or 0
        content = [
            _token_logprob(token_id, position, top)
            for token_id, position in zip(child.token_ids[start:], child.logprobs[start:])
        ]
        return ChatLogprobs(content=content)


def _token_logprob(token_id: int, position: PositionLogprobs, top: int) -> TokenLogprob:
    chosen = position[token_id]
    ranked = sorted(position.values(), key=lambda lp: lp.rank if lp.rank is not None else 0)[:top]
    token = chosen.decoded_token or ""
    return TokenLogprob(
        token=token, logprob=chosen.logprob, bytes=list(token.encode()),
        top_logprobs=[
            TopLogprob(token=lp.decoded_token or "", logprob=lp.logprob, bytes=list((lp.decoded_token or "").encode()))
            for lp in ranked
        ],
    )


def _conversation(messages: list[ChatMessage]) -> Conversation:
    if not messages:
        raise OpenAIError("messages must not be empty", param="messages")
    conversation: Conversation = []
    for i, message in enumerate(messages):
        role = _ROLES.get(message.role)
        if role is None:
            raise OpenAIError(
                f"messages[{i}].role {message.role!r} is not supported: use one of {sorted(_ROLES)}",
                param=f"messages.{i}.role",
            )
        conversation.append({"role": role, "content": _text(message.content, i)})
    return conversation


def _text(content: Any, i: int) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    for part in content:
        if part.type != "text" or part.text is None:
            raise OpenAIError(
                f"messages[{i}] has a content part of type {part.type!r}: only text parts are supported",
                param=f"messages.{i}.content",
            )
    return "".join(part.text for part in content)


def _refuse_unsupported(request: ChatCompletionRequest) -> None:
    refuse_unsupported({
        "tools": request.tools or None,
        "tool_choice": None if request.tool_choice in (None, "none", "auto") else request.tool_choice,
        "functions": request.functions or None,
        "function_call": None if request.function_call in (None, "none", "auto") else request.function_call,
        "audio": request.audio,
        "modalities": None if request.modalities in (None, ["text"]) else request.modalities,
        "prediction": request.prediction,
        "web_search_options": request.web_search_options,
    })
