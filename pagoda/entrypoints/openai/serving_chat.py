"""POST /v1/chat/completions: messages (and tools) through the chat template (their content as a
string or as parts, --chat-template-content-format; a vision-language model's image_url parts
through its image processor, pagoda/multimodal/media.py), one engine request (n choices) or a beam
search of n beams (use_beam_search); each choice's text split into reasoning and content
(--reasoning-parser), the content read as tool calls when the request has tools (tool_choice.py)."""

from __future__ import annotations

import asyncio
import functools
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import jinja2

from pagoda.multimodal.media import ImagePartError
from pagoda.entrypoints.chat_utils import (
    ADD_SPECIAL_TOKENS_TO_RENDERED, Conversation, check_template_kwargs, render_chat_text,
)
from pagoda.outputs import CompletionOutput, Logprob, PositionLogprobs, RequestOutput

from .preprocess import DeadlineExceeded, run_with_deadline, tokenize_prompt
from .reasoning import ReasoningSplitter, reasoning_splitter
from .protocol import (
    ChatChoice, ChatCompletionChunk, ChatCompletionRequest, ChatCompletionResponse, ChatLogprobs, ChatMessage,
    ChatResponseMessage, ChatStreamChoice, DeltaMessage, TextPart, TokenizeRequest, TokenLogprob, ToolCall,
    TopLogprob,
)
from .serving_engine import (
    OpenAIError, OpenAIServing, merge, new_request_id, prompt_logprobs, refuse_unsupported, sse, sse_stream,
    sub_request_ids,
)
from .tool_choice import ToolCalling, template_tools, tool_calling
from .tool_parsers import ToolCallStream
from .structured_outputs import structured_outputs

# "developer" is OpenAI's newer name for "system", which the chat templates know.
_ROLES = {"developer": "system"}
# What rendering a chat template raises on a request's input: jinja2's errors, transformers'
# ValueError (no template, a role it refuses), and what the template's own expressions raise
# ({{ 1 // 0 }}, a call on the wrong type, a macro that recurses without end).
_TEMPLATE_ERRORS = (
    jinja2.TemplateError, ValueError, TypeError, ArithmeticError, LookupError, AttributeError, RecursionError,
)


@dataclass
class ChatRun:
    """A chat request added to the engine: its outputs, and what answering it needs. The caller
    aborts ids when done."""

    request_id: str
    ids: list[str]
    prompt_ids: list[int]
    n: int
    outputs: AsyncIterator[RequestOutput]
    role: str  # of the reply: --response-role's, or the last message's when it is continued
    echo: str  # what the reply starts with (request.echo), else ""
    tools: ToolCalling  # how its text is read as tool calls

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_ids)


class OpenAIServingChat(OpenAIServing):
    prompt_param = "messages"
    param_names = {"logprobs": "top_logprobs"}

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
        lora = self.check_model(request.model)
        _refuse_unsupported(request)
        tools = tool_calling(request, self.config.tool_parser, self.tokenizer)
        add_generation_prompt = adds_generation_prompt(request)
        prompt_text, prompt_ids, images = await self.render(
            request.messages, request.chat_template, add_generation_prompt, request.continue_final_message,
            request.chat_template_kwargs, template_tools(request), request.add_special_tokens, request.documents,
            length_limit=self.length_limit(request),
        )
        prompt_ids = self.truncate(request, prompt_ids)
        if request.top_logprobs is not None and not request.logprobs:
            raise OpenAIError("top_logprobs needs logprobs set to true", param="top_logprobs")
        logprobs = (request.top_logprobs or 0) if request.logprobs else None
        max_tokens = request.max_completion_tokens if request.max_completion_tokens is not None else request.max_tokens
        # A parser whose markers may be special tokens needs them left in the text, as in vLLM.
        keep_specials = tools.parser is not None and tools.parser.keeps_special_tokens
        extra = {"skip_special_tokens": False} if keep_specials else {}
        constraint = await structured_outputs(request, tools.json_schema)
        params = self.sampling_params(
            request, max_tokens, len(prompt_ids), logprobs, structured_outputs=constraint, **extra
        )
        request_id = new_request_id(id_prefix)
        prompts = [(prompt_text, prompt_ids)]
        if request.use_beam_search:
            if images:
                raise OpenAIError("use_beam_search is not supported with images yet", param="use_beam_search")
            ids = sub_request_ids(request_id, 1)
            streams = self.beam_searches(request, ids, prompts, [params.max_tokens], params.n, "n", lora)
        else:
            streams = await self.add_requests(
                request_id, prompts, [params], "messages", lora, images, request.cache_salt, request.priority
            )
        # As vLLM's: a reply opens a turn of --response-role's, or continues the last message's.
        role = self.config.response_role if add_generation_prompt else request.messages[-1].role
        last = request.messages[-1]
        echo = _text(last.content) if request.echo and last.role == role else ""
        return ChatRun(
            request_id, sub_request_ids(request_id, 1), prompt_ids, params.n, streams[0], role, echo, tools
        )

    async def render(
        self, messages: list[ChatMessage], chat_template: str | None, add_generation_prompt: bool,
        continue_final_message: bool = False, template_kwargs: dict[str, Any] | None = None,
        tools: list[dict[str, Any]] | None = None, add_special_tokens: bool = ADD_SPECIAL_TOKENS_TO_RENDERED,
        documents: list[dict[str, str]] | None = None, *, length_limit: int | None,
    ) -> tuple[str, list[int], list[Any]]:
        """The prompt of a conversation and its images, rendered (by the request's chat_template,
        else the server's) and tokenized off the event loop; a request's own template without
        --trust-request-chat-template, a template that rejects the conversation (e.g. roles that do
        not alternate), fails or runs past the server's time bound, a prompt far beyond
        length_limit (None: no such check), or an image part that gives no image, is the client's
        error."""
        if chat_template is not None and not self.config.limits.trust_request_chat_template:
            raise OpenAIError(
                "Chat template is passed with request, but --trust-request-chat-template is not set. "
                "Refused request with untrusted chat template.", param="chat_template",
            )
        conversation, images = await self._images(_conversation(messages))
        try:
            check_template_kwargs(template_kwargs)
        except ValueError as error:
            raise OpenAIError(str(error), param="chat_template_kwargs") from None
        tokenizer = self.require_tokenizer()
        processor = self.engine.processor.image_processor
        render = functools.partial(
            render_chat_text, tokenizer, conversation, chat_template or self.config.chat_template,
            add_generation_prompt, continue_final_message, template_kwargs, tools, documents,
            self.config.chat_template_content_format, None if processor is None else processor.placeholder,
        )
        bound = self.config.limits.chat_template_timeout
        try:
            text = await run_with_deadline(render, bound, "pagoda-chat-template")
        except DeadlineExceeded:
            raise OpenAIError(
                f"the chat template took longer than {bound:g} s (--chat-template-timeout) to render these messages",
                param="chat_template" if chat_template is not None else "messages",
            ) from None
        except _TEMPLATE_ERRORS as error:
            # A request's own template is at fault first; variables a request passes can break
            # the template as much as its messages can.
            param = "chat_template" if chat_template is not None else "messages"
            if chat_template is None and template_kwargs:
                param = "chat_template_kwargs"
            raise OpenAIError(f"the chat template cannot render these messages: {error}", param=param) from None
        return text, await tokenize_prompt(tokenizer, text, add_special_tokens, length_limit, "messages"), images

    async def _images(self, conversation: Conversation) -> tuple[Conversation, list[Any]]:
        """The conversation with its image parts made {"type": "image"} parts, and their images
        (decoded off the event loop)."""
        processor = self.engine.processor.image_processor
        for i, turn in enumerate(conversation):
            content = turn["content"]
            kinds = [part["type"] for part in content if part["type"] != "text"] if isinstance(content, list) else []
            if kinds and processor is None:
                raise OpenAIError(
                    f"messages[{i}] has a content part of type {kinds[0]!r}: the model {self.model_name} "
                    "takes text only",
                    param=f"messages.{i}.content",
                )
        if processor is None:
            return conversation, []
        try:
            return await asyncio.to_thread(processor.chat_images, conversation)
        except ImagePartError as error:
            raise OpenAIError(str(error), param=error.param) from None

    def splitter(self, request: ChatCompletionRequest) -> ReasoningSplitter | None:
        """One choice's reasoning splitter (--reasoning-parser), or None."""
        return reasoning_splitter(self.config.reasoning_parser, request.chat_template_kwargs)

    async def _full(self, request: ChatCompletionRequest, run: ChatRun) -> ChatCompletionResponse:
        final = None
        async for _, output in merge([run.outputs]):
            final = output
        run.prompt_ids = final.prompt_token_ids  # the engine's: image placeholders expanded
        choices = [self._choice(request, run, child) for child in final.outputs]
        completion_tokens = sum(len(c.token_ids) for c in final.outputs)
        return ChatCompletionResponse(
            id=run.request_id, model=self.response_model(request.model), choices=choices,
            usage=self.usage(run.prompt_tokens, completion_tokens, final.num_cached_tokens),
            prompt_logprobs=prompt_logprobs(request, final),
            prompt_token_ids=run.prompt_ids if request.return_token_ids else None,
        )

    def _choice(self, request: ChatCompletionRequest, run: ChatRun, child: CompletionOutput) -> ChatChoice:
        splitter = self.splitter(request)
        reasoning, content = ("", child.text) if splitter is None else splitter.split(child.text)
        tool_calls, finish_reason = None, child.finish_reason
        if run.tools.parser is not None:
            extracted = run.tools.parser.extract(content)
            if extracted.tool_calls:
                content, tool_calls = extracted.content or "", extracted.tool_calls
                finish_reason = run.tools.finish_reason or finish_reason
        reasoning = (reasoning or None) if request.include_reasoning else None
        content = run.echo + content
        # As vLLM's: no content at all (the output stopped in or right after the thinking, or was
        # all tool calls) is null.
        if splitter is not None or tool_calls:
            content = content or None
        message = ChatResponseMessage(
            role=run.role, content=content, reasoning_content=reasoning, reasoning=reasoning, tool_calls=tool_calls
        )
        return ChatChoice(
            index=child.index, message=message, logprobs=self.logprobs(request, child, 0),
            finish_reason=finish_reason, stop_reason=child.stop_reason,
            token_ids=child.token_ids if request.return_token_ids else None,
        )

    async def _stream(self, request: ChatCompletionRequest, run: ChatRun) -> AsyncIterator[str]:
        sent = [0] * run.n  # output tokens already sent, per choice
        cached = 0
        include_usage, continuous_usage = self.stream_usage(request.stream_options)
        texts = [StreamedText(run.tools, self.splitter(request), request.include_reasoning) for _ in range(run.n)]

        def chunk(choices: list[ChatStreamChoice], **fields: Any) -> str:
            usage = self.usage(run.prompt_tokens, sum(sent), cached) if continuous_usage else None
            return sse(ChatCompletionChunk(
                id=run.request_id, model=self.response_model(request.model), choices=choices, usage=usage, **fields
            ))

        # OpenAI opens each choice with the role, before any content; vLLM's prompt token ids come with it.
        yield chunk(
            [ChatStreamChoice(index=i, delta=DeltaMessage(role=run.role, content="")) for i in range(run.n)],
            prompt_token_ids=run.prompt_ids if request.return_token_ids else None,
        )
        if run.echo:
            yield chunk([ChatStreamChoice(index=i, delta=DeltaMessage(content=run.echo)) for i in range(run.n)])
        async for _, output in merge([run.outputs]):
            cached = output.num_cached_tokens
            run.prompt_ids = output.prompt_token_ids  # the engine's: image placeholders expanded
            choices = [self._stream_choice(request, child, sent, texts[child.index]) for child in output.outputs]
            choices = [c for c in choices if c is not None]
            if choices:
                yield chunk(choices)
        if include_usage:
            usage = self.usage(run.prompt_tokens, sum(sent), cached)
            model = self.response_model(request.model)
            yield sse(ChatCompletionChunk(id=run.request_id, model=model, choices=[], usage=usage))

    def _stream_choice(
        self, request: ChatCompletionRequest, child: CompletionOutput, sent: list[int], text: StreamedText
    ) -> ChatStreamChoice | None:
        start = sent[child.index]
        if not child.text_delta and len(child.token_ids) == start and child.finish_reason is None:
            return None
        sent[child.index] = len(child.token_ids)
        delta, finish_reason = text.add(child.text_delta, child.finish_reason)
        if delta is None and finish_reason is None and not request.logprobs:
            return None  # held back: a reasoning marker or a tool call not yet whole
        return ChatStreamChoice(
            index=child.index, delta=delta or DeltaMessage(), logprobs=self.logprobs(request, child, start),
            finish_reason=finish_reason, stop_reason=child.stop_reason,
            token_ids=child.token_ids[start:] if request.return_token_ids else None,
        )

    def logprobs(self, request: ChatCompletionRequest, child: CompletionOutput, start: int) -> ChatLogprobs | None:
        """A choice's logprobs from its token `start` on (the Responses route's output text takes
        them too); None unless the request asks for them."""
        if not request.logprobs or child.logprobs is None:
            return None
        content = [
            self._token_logprob(request, token_id, position)
            for token_id, position in zip(child.token_ids[start:], child.logprobs[start:])
        ]
        return ChatLogprobs(content=content)

    def _token_logprob(self, request: ChatCompletionRequest, token_id: int, position: PositionLogprobs) -> TokenLogprob:
        top = request.top_logprobs or 0
        if top == -1:  # the whole vocabulary, all of which the position holds
            top = len(position)
        ranked = sorted(position.items(), key=lambda item: item[1].rank if item[1].rank is not None else 0)[:top]
        token = self.token_text(request, position[token_id].decoded_token, token_id)
        return TokenLogprob(
            token=token, logprob=position[token_id].logprob, bytes=list(token.encode()),
            top_logprobs=[self._top_logprob(request, i, lp) for i, lp in ranked],
        )

    def _top_logprob(self, request: ChatCompletionRequest, token_id: int, logprob: Logprob) -> TopLogprob:
        token = self.token_text(request, logprob.decoded_token, token_id)
        return TopLogprob(token=token, logprob=logprob.logprob, bytes=list(token.encode()))


class StreamedText:
    """One streamed choice's text so far, and the delta each new piece makes: its reasoning and
    content (--reasoning-parser), the content read as tool calls when the request has tools."""

    def __init__(self, tools: ToolCalling, splitter: ReasoningSplitter | None, include_reasoning: bool) -> None:
        self.tools, self.splitter, self.include_reasoning = tools, splitter, include_reasoning
        self.content = ""
        self.calls = ToolCallStream(tools.parser) if tools.parser is not None else None

    def add(self, piece: str, finish_reason: str | None) -> tuple[DeltaMessage | None, str | None]:
        """The delta (None: nothing of it can go out yet) and the finish reason to send."""
        if self.splitter is None and self.calls is None:
            return DeltaMessage(content=piece), finish_reason
        final = finish_reason is not None
        reasoning, content = self._split(piece, final)
        tool_calls = None
        if self.calls is not None:
            self.content += content
            content, deltas = self.calls.step(self.content, final=final)
            tool_calls = deltas or None
            if final and self.calls.called:
                finish_reason = self.tools.finish_reason or finish_reason
        if not reasoning and not content and not tool_calls:
            return None, finish_reason
        delta = DeltaMessage(
            content=content or None, reasoning_content=reasoning or None, reasoning=reasoning or None,
            tool_calls=tool_calls,
        )
        return delta, finish_reason

    def _split(self, piece: str, final: bool) -> tuple[str, str]:
        if self.splitter is None:
            return "", piece
        reasoning, content = self.splitter.feed(piece)
        if final:
            rest_reasoning, rest_content = self.splitter.finish()
            reasoning, content = reasoning + rest_reasoning, content + rest_content
        return (reasoning if self.include_reasoning else ""), content


def _conversation(messages: list[ChatMessage]) -> Conversation:
    if not messages:
        raise OpenAIError("messages must not be empty", param="messages")
    conversation: Conversation = []
    for i, message in enumerate(messages):
        if not message.role:
            raise OpenAIError(f"messages[{i}].role must not be empty", param=f"messages.{i}.role")
        # Other roles go to the template as they are (as in vLLM): a template may know its own.
        turn: dict[str, Any] = {"role": _ROLES.get(message.role, message.role), "content": _content(message.content, i)}
        if message.tool_calls:
            turn["tool_calls"] = [_template_tool_call(call, i) for call in message.tool_calls]
        if message.tool_call_id is not None:
            turn["tool_call_id"] = message.tool_call_id
        if message.name is not None:
            turn["name"] = message.name
        conversation.append(turn)
    return conversation


def _template_tool_call(call: ToolCall, i: int) -> dict[str, Any]:
    """A call from the history as chat templates take it: the arguments as an object (templates
    write them with tojson), as vLLM passes them."""
    try:
        arguments = json.loads(call.function.arguments)
    except ValueError:
        raise OpenAIError(
            f"messages[{i}].tool_calls: arguments {call.function.arguments!r} are not JSON",
            param=f"messages.{i}.tool_calls",
        ) from None
    return {**call.model_dump(exclude_none=True), "function": {"name": call.function.name, "arguments": arguments}}


def adds_generation_prompt(request: ChatCompletionRequest | TokenizeRequest) -> bool:
    """Whether the prompt ends by opening the assistant's turn: not when the last message is
    continued, and a request that asks for both is refused (as vLLM refuses it)."""
    if not request.continue_final_message:
        return request.add_generation_prompt
    if request.add_generation_prompt and "add_generation_prompt" in request.model_fields_set:
        raise OpenAIError(
            "continue_final_message and add_generation_prompt cannot both be true", param="continue_final_message"
        )
    return False


def _content(content: str | list[TextPart] | None, i: int) -> str | list[dict[str, Any]] | None:
    """A message's content for the template: its parts as dicts (chat_utils.format_content makes
    text parts one string where the template takes strings)."""
    if content is None or isinstance(content, str):
        return content
    for part in content:
        if part.type == "text" and part.text is None:
            raise OpenAIError(f"messages[{i}] has a text part without text", param=f"messages.{i}.content")
    return [part.model_dump(exclude_none=True) for part in content]


def _text(content: str | list[TextPart] | None) -> str:
    """A message's text: its text parts joined, without its images."""
    if content is None or isinstance(content, str):
        return content or ""
    return "".join(part.text or "" for part in content if part.type == "text")


def _refuse_unsupported(request: ChatCompletionRequest) -> None:
    refuse_unsupported({
        "functions": request.functions or None,
        "function_call": None if request.function_call in (None, "none", "auto") else request.function_call,
        "audio": request.audio,
        "modalities": None if request.modalities in (None, ["text"]) else request.modalities,
        "prediction": request.prediction,
        "web_search_options": request.web_search_options,
    })
