"""POST /v1/chat/completions: messages through the chat template, one engine request (n choices)."""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import jinja2

from pagoda.entrypoints.chat_utils import (
    ADD_SPECIAL_TOKENS_TO_RENDERED, RESERVED_TEMPLATE_KWARGS, Conversation, render_chat_text,
)
from pagoda.outputs import CompletionOutput, PositionLogprobs, RequestOutput

from .preprocess import DeadlineExceeded, run_with_deadline, tokenize_prompt
from .reasoning import ReasoningSplitter, reasoning_splitter
from .protocol import (
    ChatChoice, ChatCompletionChunk, ChatCompletionRequest, ChatCompletionResponse, ChatLogprobs, ChatMessage,
    ChatResponseMessage, ChatStreamChoice, DeltaMessage, TokenLogprob, TopLogprob,
)
from .serving_engine import (
    OpenAIError, OpenAIServing, merge, new_request_id, prompt_logprobs, refuse_unsupported, sse, sse_stream,
    sub_request_ids, usage,
)

# "developer" is OpenAI's newer name for "system", which the chat templates know.
_ROLES = {"developer": "system"}


@dataclass
class ChatRun:
    """A chat request added to the engine: its outputs, and what answering it needs. The caller
    aborts ids when done."""

    request_id: str
    ids: list[str]
    prompt_tokens: int
    n: int
    outputs: AsyncIterator[RequestOutput]
    role: str  # of the reply: the assistant's, or the last message's when it is continued
    echo: str  # what the reply starts with (request.echo), else ""


class OpenAIServingChat(OpenAIServing):
    async def create(self, request: ChatCompletionRequest) -> ChatCompletionResponse | AsyncIterator[str]:
        run = await self.start(request, "chatcmpl")
        if request.stream:
            return sse_stream(self._stream(request, run), self.engine, run.ids)
        try:
            return await self._full(request, run)
        finally:
            self.engine.abort(run.ids)

    async def start(self, request: ChatCompletionRequest, id_prefix: str) -> ChatRun:
        """Check, render and add a chat request to the engine (the chat and Responses routes share this)."""
        self.check_model(request.model)
        _refuse_unsupported(request)
        if request.chat_template is not None and not self.config.limits.trust_request_chat_template:
            raise OpenAIError(
                "Chat template is passed with request, but --trust-request-chat-template is not set. "
                "Refused request with untrusted chat template.", param="chat_template",
            )
        add_generation_prompt = _add_generation_prompt(request)
        prompt_text, prompt_ids = await self.render(
            request.messages, request.chat_template, add_generation_prompt, request.continue_final_message,
            request.chat_template_kwargs,
        )
        if request.top_logprobs is not None and not request.logprobs:
            raise OpenAIError("top_logprobs needs logprobs set to true", param="top_logprobs")
        logprobs = (request.top_logprobs or 0) if request.logprobs else None
        max_tokens = request.max_completion_tokens if request.max_completion_tokens is not None else request.max_tokens
        params = self.sampling_params(request, max_tokens, len(prompt_ids), logprobs)
        request_id = new_request_id(id_prefix)
        streams = await self.add_requests(request_id, [(prompt_text, prompt_ids)], [params], "messages")
        role = "assistant" if add_generation_prompt else request.messages[-1].role
        last = request.messages[-1]
        echo = _text(last.content, len(request.messages) - 1) if request.echo and last.role == role else ""
        return ChatRun(request_id, sub_request_ids(request_id, 1), len(prompt_ids), params.n, streams[0], role, echo)

    async def render(
        self, messages: list[ChatMessage], chat_template: str | None, add_generation_prompt: bool,
        continue_final_message: bool = False, template_kwargs: dict[str, Any] | None = None,
    ) -> tuple[str, list[int]]:
        """The prompt of a conversation, rendered and tokenized off the event loop; a template that
        rejects it (e.g. roles that do not alternate) or runs past the server's time bound, or a
        prompt far beyond the context, is the client's error."""
        conversation = _conversation(messages)
        _check_template_kwargs(template_kwargs)
        tokenizer = self.require_tokenizer()
        render = functools.partial(
            render_chat_text, tokenizer, conversation, chat_template or self.config.chat_template,
            add_generation_prompt, continue_final_message, template_kwargs,
        )
        bound = self.config.limits.chat_template_timeout
        try:
            text = await run_with_deadline(render, bound, "pagoda-chat-template")
        except DeadlineExceeded:
            raise OpenAIError(
                f"the chat template took longer than {bound:g} s (--chat-template-timeout) to render these messages",
                param="chat_template" if chat_template is not None else "messages",
            ) from None
        except (jinja2.TemplateError, ValueError, TypeError) as error:
            # Variables a request passes can break the template as much as its messages can.
            raise OpenAIError(
                f"the chat template cannot render these messages: {error}",
                param="chat_template_kwargs" if template_kwargs else "messages",
            ) from None
        limit = self.config.max_model_len
        return text, await tokenize_prompt(tokenizer, text, ADD_SPECIAL_TOKENS_TO_RENDERED, limit, "messages")

    def splitter(self, request: ChatCompletionRequest) -> ReasoningSplitter | None:
        """One choice's reasoning splitter (--reasoning-parser), or None."""
        return reasoning_splitter(self.config.reasoning_parser, request.chat_template_kwargs)

    async def _full(self, request: ChatCompletionRequest, run: ChatRun) -> ChatCompletionResponse:
        final = None
        async for _, output in merge([run.outputs]):
            final = output
        choices = [
            ChatChoice(
                index=child.index, message=self._message(request, run, child.text),
                logprobs=self._logprobs(request, child, 0), finish_reason=child.finish_reason,
                stop_reason=child.stop_reason,
            )
            for child in final.outputs
        ]
        completion_tokens = sum(len(c.token_ids) for c in final.outputs)
        return ChatCompletionResponse(
            id=run.request_id, model=self.model_name, choices=choices,
            usage=usage(run.prompt_tokens, completion_tokens), prompt_logprobs=prompt_logprobs(request, final),
        )

    def _message(self, request: ChatCompletionRequest, run: ChatRun, text: str) -> ChatResponseMessage:
        splitter = self.splitter(request)
        if splitter is None:
            return ChatResponseMessage(role=run.role, content=run.echo + text)
        reasoning, content = splitter.split(text)
        reasoning = (reasoning or None) if request.include_reasoning else None
        # As vLLM's: no content at all (the output stopped in or right after the thinking) is null.
        content = (run.echo + content) or None
        return ChatResponseMessage(role=run.role, content=content, reasoning_content=reasoning, reasoning=reasoning)

    async def _stream(self, request: ChatCompletionRequest, run: ChatRun) -> AsyncIterator[str]:
        sent = [0] * run.n  # output tokens already sent, per choice
        splitters = [self.splitter(request) for _ in range(run.n)]
        # OpenAI opens each choice with the role, before any content.
        yield self._chunk(run.request_id, [
            ChatStreamChoice(index=i, delta=DeltaMessage(role=run.role, content="")) for i in range(run.n)
        ])
        if run.echo:
            yield self._chunk(run.request_id, [
                ChatStreamChoice(index=i, delta=DeltaMessage(content=run.echo)) for i in range(run.n)
            ])
        async for _, output in merge([run.outputs]):
            choices = [self._stream_choice(request, child, sent, splitters[child.index]) for child in output.outputs]
            choices = [c for c in choices if c is not None]
            if choices:
                yield self._chunk(run.request_id, choices)
        if request.stream_options and request.stream_options.include_usage:
            chunk = ChatCompletionChunk(
                id=run.request_id, model=self.model_name, choices=[], usage=usage(run.prompt_tokens, sum(sent))
            )
            yield sse(chunk)

    def _stream_choice(
        self, request: ChatCompletionRequest, child: CompletionOutput, sent: list[int],
        splitter: ReasoningSplitter | None,
    ) -> ChatStreamChoice | None:
        start = sent[child.index]
        if not child.text_delta and len(child.token_ids) == start and child.finish_reason is None:
            return None
        sent[child.index] = len(child.token_ids)
        delta = DeltaMessage(content=child.text_delta)
        if splitter is not None:
            delta = _reasoning_delta(splitter, child, request.include_reasoning)
            if delta is None and not request.logprobs and child.finish_reason is None:
                return None
        return ChatStreamChoice(
            index=child.index, delta=delta or DeltaMessage(),
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
        if not message.role:
            raise OpenAIError(f"messages[{i}].role must not be empty", param=f"messages.{i}.role")
        # Other roles go to the template as they are (as in vLLM): a template may know its own.
        role = _ROLES.get(message.role, message.role)
        conversation.append({"role": role, "content": _text(message.content, i)})
    return conversation


def _add_generation_prompt(request: ChatCompletionRequest) -> bool:
    """Whether the prompt ends by opening the assistant's turn: not when the last message is
    continued, and a request that asks for both is refused (as vLLM refuses it)."""
    if not request.continue_final_message:
        return request.add_generation_prompt
    if request.add_generation_prompt and "add_generation_prompt" in request.model_fields_set:
        raise OpenAIError(
            "continue_final_message and add_generation_prompt cannot both be true", param="continue_final_message"
        )
    return False


def _check_template_kwargs(template_kwargs: dict[str, Any] | None) -> None:
    clashes = sorted(RESERVED_TEMPLATE_KWARGS.intersection(template_kwargs or {}))
    if clashes:
        raise OpenAIError(
            f"chat_template_kwargs may not set {clashes}: they are the server's own arguments to the template",
            param="chat_template_kwargs",
        )


def _reasoning_delta(splitter: ReasoningSplitter, child: CompletionOutput, include_reasoning: bool) -> DeltaMessage | None:
    """A streamed piece split into reasoning and content; None when nothing of it can go out yet."""
    reasoning, content = splitter.feed(child.text_delta)
    if child.finish_reason is not None:
        rest_reasoning, rest_content = splitter.finish()
        reasoning, content = reasoning + rest_reasoning, content + rest_content
    reasoning = reasoning if include_reasoning else ""
    if not reasoning and not content:
        return None
    return DeltaMessage(content=content or None, reasoning_content=reasoning or None, reasoning=reasoning or None)


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
    format_type = (request.response_format or {}).get("type", "text")
    refuse_unsupported({
        "tools": request.tools or None,
        "tool_choice": None if request.tool_choice in (None, "none", "auto") else request.tool_choice,
        "functions": request.functions or None,
        "function_call": None if request.function_call in (None, "none", "auto") else request.function_call,
        "response_format": None if format_type == "text" else request.response_format,
        "audio": request.audio,
        "modalities": None if request.modalities in (None, ["text"]) else request.modalities,
        "prediction": request.prediction,
        "web_search_options": request.web_search_options,
    })
