"""POST /v1/responses (OpenAI's Responses API), GET, DELETE and POST .../cancel of
/v1/responses/{id}. The instructions, a stored earlier response's conversation
(previous_response_id) and the input become chat messages that take the chat route's own path
(template, sampling, one engine request), as do `tools`, `tool_choice` (the chat route's tool
calling), `text.format` (its structured outputs), include's message.output_text.logprobs (its
logprobs) and truncation "auto" (its truncate_prompt_tokens); earlier function calls and their
outputs in `input` become the assistant's tool calls and tool messages. The reply comes back as
output items (the thinking, with --reasoning-parser, then the message and the function calls),
whole or as OpenAI's typed server-sent events; with `background`, in a task of its own, stored as
it goes (and its events, when streamed) until it ends or is cancelled."""

from __future__ import annotations

import asyncio
import functools
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from pagoda.outputs import CompletionOutput

from .protocol import (
    ChatCompletionRequest, ChatCompletionToolParam, ChatMessage, DeltaMessage, DeltaToolCall, FunctionCall,
    FunctionDefinition, NamedFunction, NamedToolChoice, TokenLogprob, ToolCall, ToolChoice,
)
from .protocol_responses import (
    INCLUDE_LOGPROBS, FunctionCallItem, IncompleteDetails, InputContentPart, InputItem, OutputItem, OutputMessage,
    OutputText, ReasoningItem, ReasoningText, ResponseDeleted, ResponseObject, ResponsesRequest,
    ResponsesToolChoice, ResponseUsage, TextConfig, ToolChoiceFunction,
)
from .response_store import EventLog, ResponseStore, StoredResponse
from .serving_chat import ChatRun, OpenAIServingChat, StreamedText
from .serving_engine import OpenAIError, as_openai_error, merge, refuse_unsupported

# A chat request's parameters under the names the Responses API gives them.
_PARAMS = {
    "messages": "input", "max_tokens": "max_output_tokens", "max_completion_tokens": "max_output_tokens",
    "response_format": "text.format", "truncate_prompt_tokens": "truncation",
}
_TEXT_PARTS = ("input_text", "output_text", "text")


@dataclass
class _Turn:
    """A response under way: its request, the chat request and engine run that answer it, the
    conversation it answers, and its reply so far."""

    request: ResponsesRequest
    chat_request: ChatCompletionRequest
    run: ChatRun
    messages: list[ChatMessage]
    text: StreamedText
    created_at: int = field(default_factory=lambda: int(time.time()))
    output: _Output = field(default_factory=lambda: _Output())
    child: CompletionOutput | None = None  # the engine request's latest output
    response: ResponseObject | None = None  # as last stored
    events: EventLog | None = None  # a streamed background response's


class OpenAIServingResponses:
    def __init__(self, chat: OpenAIServingChat, store: ResponseStore) -> None:
        self.chat, self.store = chat, store
        self._background: dict[str, tuple[_Turn, asyncio.Task]] = {}  # those under way, by response id

    async def create(self, request: ResponsesRequest) -> ResponseObject | AsyncIterator[str]:
        self._check(request)
        history = self._history(request.previous_response_id)
        messages = history + _input_messages(request.input)
        chat_request = _chat_request(request, messages, self.chat.config.max_model_len)
        try:
            run = await self.chat.start(chat_request, "resp")
        except OpenAIError as error:
            raise _renamed(error) from None
        text = StreamedText(run.tools, self.chat.splitter(chat_request), include_reasoning=True)
        turn = _Turn(request, chat_request, run, messages, text)
        if request.background:
            return self._start_background(turn)
        if request.stream:
            return self._stream(turn)
        try:
            final = None
            async for _, output in merge([run.outputs]):
                final = output
        finally:
            self.chat.engine.abort(run.ids)
        child = final.outputs[0]
        turn.output.add(text.add(child.text, child.finish_reason)[0])
        return self._finish(turn, child)

    def retrieve(
        self, response_id: str, stream: bool = False, starting_after: int | None = None
    ) -> ResponseObject | AsyncIterator[str]:
        """A stored response; with stream, a streamed background response's events after the one
        numbered starting_after (from the first when None), following those still to come."""
        stored = self._stored(response_id)
        if not stream:
            return stored.response
        if stored.events is None:
            raise OpenAIError(
                f"Response '{response_id}' cannot be streamed: only one created with background and stream true can",
                param="stream",
            )
        return stored.events.follow(0 if starting_after is None else starting_after + 1)

    async def cancel(self, response_id: str) -> ResponseObject:
        """Stop a background response under way: its engine request is aborted, and it is stored
        as cancelled, with its output so far."""
        running = self._background.get(response_id)
        if running is None or running[1].done():
            status = self._stored(response_id).response.status
            raise OpenAIError(
                f"Cannot cancel response '{response_id}': it is {status}, and only a background response under "
                "way can be cancelled.", param="response_id",
            )
        turn, task = running
        await _stop(task)
        return turn.response

    async def delete(self, response_id: str) -> ResponseDeleted:
        """Forget a stored response; one under way in the background is cancelled first."""
        running = self._background.get(response_id)
        if running is not None:
            await _stop(running[1])
        if not self.store.delete(response_id):
            raise _not_found(response_id)
        return ResponseDeleted(id=response_id)

    async def shutdown(self) -> None:
        """Cancel the background responses under way: the server is stopping."""
        await asyncio.gather(*(_stop(task) for _, task in list(self._background.values())))

    def _check(self, request: ResponsesRequest) -> None:
        _refuse_unsupported(request)
        for value in request.include or []:
            if value != INCLUDE_LOGPROBS:
                raise OpenAIError(
                    f"include value {value!r} is not supported: only {INCLUDE_LOGPROBS!r} is",
                    param="include", code="unsupported_parameter",
                )
        if request.background and not (request.store and self.store.enabled):
            why = "store is false" if not request.store else (
                "this server stores no responses (--max-stored-responses or --stored-response-ttl is 0)"
            )
            raise OpenAIError(f"background needs the response stored, and {why}", param="background")

    def _stored(self, response_id: str) -> StoredResponse:
        stored = self.store.get(response_id)
        if stored is None:
            raise _not_found(response_id)
        return stored

    def _history(self, previous_response_id: str | None) -> list[ChatMessage]:
        if previous_response_id is None:
            return []
        stored = self.store.get(previous_response_id)
        if stored is None:
            raise OpenAIError(
                f"Previous response with id '{previous_response_id}' not found (responses are kept "
                f"{self.store.ttl:g} s, at most {self.store.max_count} of them, and only those created with store "
                "true).", 404, param="previous_response_id", code="previous_response_not_found",
            )
        return list(stored.messages)

    def _start_background(self, turn: _Turn) -> ResponseObject | AsyncIterator[str]:
        """Generate in a task of its own; the POST answers the queued response, or follows its events."""
        if turn.request.stream:
            turn.events = EventLog()
        queued = self._put(turn, self._response(turn, "queued"))
        task = asyncio.create_task(self._run_background(turn), name=f"background {turn.run.request_id}")
        self._background[turn.run.request_id] = (turn, task)
        task.add_done_callback(functools.partial(self._background_ended, turn))
        return turn.events.follow() if turn.events is not None else queued

    async def _run_background(self, turn: _Turn) -> None:
        """A background response, stored as it goes (its events logged when streamed); a failure is
        stored as a failed response with its error."""
        self._put(turn, self._response(turn, "in_progress"))
        try:
            async for event in self._events(turn):
                if turn.events is not None:
                    turn.events.append(event)
        except Exception as error:
            failure = as_openai_error(error)
            if turn.events is not None:
                turn.events.append(_error_event(turn.output, failure))
            error_info = {"code": failure.code or failure.type, "message": str(failure)}
            self._put(turn, self._response(turn, "failed", output=turn.output.items, error=error_info))

    def _background_ended(self, turn: _Turn, task: asyncio.Task) -> None:
        """Its task has ended (done callbacks run before those awaiting it): the engine request goes
        however it ended, and a cancelled one is stored so, with its output so far."""
        del self._background[turn.run.request_id]
        self.chat.engine.abort(turn.run.ids)
        if task.cancelled():
            turn.output.close("incomplete", self._logprobs(turn, 0))
            self._put(turn, self._response(turn, "cancelled", output=turn.output.items, usage=self._usage(turn)))
        if turn.events is not None:
            turn.events.end()

    async def _stream(self, turn: _Turn) -> AsyncIterator[str]:
        """The response's events; an error once they have begun is an `error` event (OpenAI's),
        and the engine request is aborted however the stream ends."""
        try:
            async for event in self._events(turn):
                yield event
        except Exception as error:
            yield _error_event(turn.output, as_openai_error(error))
        finally:
            self.chat.engine.abort(turn.run.ids)

    async def _events(self, turn: _Turn) -> AsyncIterator[str]:
        """The response's events as it is generated (turn keeps the reply so far); the last one
        carries the whole response, stored when the request asks."""
        output = turn.output
        started = self._response(turn, "in_progress")
        yield output.event("response.created", response=started)
        yield output.event("response.in_progress", response=started)
        async for _, result in merge([turn.run.outputs]):
            child = result.outputs[0]
            sent = len(turn.child.token_ids) if turn.child is not None else 0
            turn.child = child
            output.pending_logprobs += self._logprobs(turn, sent)
            for event in output.add(turn.text.add(child.text_delta, child.finish_reason)[0]):
                yield event
        final = self._finish(turn, child)
        for event in output.events:
            yield event
        yield output.event(f"response.{final.status}", response=final)

    def _finish(self, turn: _Turn, child: CompletionOutput) -> ResponseObject:
        """The whole response once the output has ended (kept when the request asks it to be)."""
        turn.child = child
        incomplete = child.finish_reason == "length"
        turn.output.close("incomplete" if incomplete else "completed", self._logprobs(turn, 0))
        response = self._response(
            turn, "incomplete" if incomplete else "completed", output=turn.output.items, usage=self._usage(turn),
            incomplete_details=IncompleteDetails(reason="max_output_tokens") if incomplete else None,
        )
        if turn.request.store:
            self._put(turn, response)
        return response

    def _put(self, turn: _Turn, response: ResponseObject) -> ResponseObject:
        """Store the response as it now is, with the conversation and the reply so far."""
        turn.response = response
        output = turn.output
        reply = ChatMessage(role="assistant", content=output.text, tool_calls=output.tool_calls() or None)
        self.store.put(response, turn.messages + [reply], turn.events)
        return response

    def _logprobs(self, turn: _Turn, start: int) -> list[TokenLogprob]:
        """The logprobs of the output's tokens from `start` on, when include asks for them."""
        child = turn.child
        logprobs = self.chat.logprobs(turn.chat_request, child, start) if child is not None else None
        return logprobs.content if logprobs is not None else []

    def _usage(self, turn: _Turn) -> ResponseUsage:
        input_tokens = turn.run.prompt_tokens
        output_tokens = len(turn.child.token_ids) if turn.child is not None else 0
        return ResponseUsage(
            input_tokens=input_tokens, output_tokens=output_tokens, total_tokens=input_tokens + output_tokens
        )

    def _response(self, turn: _Turn, status: str, **fields: Any) -> ResponseObject:
        request = turn.request
        return ResponseObject(
            id=turn.run.request_id, created_at=turn.created_at, status=status, model=self.chat.model_name,
            instructions=request.instructions, max_output_tokens=request.max_output_tokens,
            previous_response_id=request.previous_response_id, temperature=request.temperature, top_p=request.top_p,
            store=request.store and self.store.enabled, metadata=request.metadata, user=request.user,
            reasoning=request.reasoning, parallel_tool_calls=request.parallel_tool_calls, tools=request.tools or [],
            tool_choice=request.tool_choice or "auto", text=request.text or TextConfig(format={"type": "text"}),
            truncation=request.truncation or "disabled", top_logprobs=request.top_logprobs,
            background=request.background, **fields,
        )


async def _stop(task: asyncio.Task) -> None:
    """Cancel a background response's task and wait for it (and its done callbacks) to end."""
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


def _not_found(response_id: str) -> OpenAIError:
    return OpenAIError(f"Response with id '{response_id}' not found.", 404, param="response_id",
                       code="response_not_found")


def _error_event(output: _Output, failure: OpenAIError) -> str:
    return output.event("error", code=failure.code, message=str(failure), param=failure.param)


class _Output:
    """A response's output items (its thinking, its message, its function calls), grown as text
    arrives, with the stream events that open, grow and close them, numbered in order."""

    def __init__(self) -> None:
        self.items: list[OutputItem] = []
        self.events: list[str] = []  # those not yet handed out
        self.text = ""  # the message's
        self.sequence_number = 0
        self._open_item: OutputItem | None = None  # the item that grows
        # Logprobs of tokens whose text no output_text delta has carried yet (include's logprobs).
        self.pending_logprobs: list[TokenLogprob] = []
        self._calls: dict[int, FunctionCallItem] = {}  # by the tool-call stream's index

    def event(self, kind: str, **fields: Any) -> str:
        payload = {"type": kind, "sequence_number": self.sequence_number, **{
            name: value.model_dump(exclude_none=True) if hasattr(value, "model_dump") else value
            for name, value in fields.items()
        }}
        self.sequence_number += 1
        return f"event: {kind}\ndata: {json.dumps(payload)}\n\n"

    def add(self, delta: DeltaMessage | None) -> list[str]:
        """The events of a piece of the reply (thinking, message, calls); returns those so far."""
        if delta is not None:
            if delta.reasoning_content:
                self._grow(ReasoningItem, delta.reasoning_content)
            if delta.content:
                self._grow(OutputMessage, delta.content)
            for call in delta.tool_calls or []:
                self._call(call)
        events, self.events = self.events, []
        return events

    def close(self, status: str, logprobs: list[TokenLogprob]) -> None:
        """End the output: every response has a message or a function call, if an empty message.
        The (last) message's text carries the whole output's logprobs, as vLLM's does."""
        if not any(isinstance(item, (OutputMessage, FunctionCallItem)) for item in self.items):
            self._grow(OutputMessage, "")
        messages = [item for item in self.items if isinstance(item, OutputMessage)]
        if messages:
            messages[-1].content[0].logprobs = logprobs
        self._close_open(status)

    def tool_calls(self) -> list[ToolCall]:
        """The function calls, as a chat history's assistant message holds them."""
        return [
            ToolCall(id=item.call_id, function=FunctionCall(name=item.name, arguments=item.arguments))
            for item in self.items if isinstance(item, FunctionCallItem)
        ]

    def _grow(self, kind: type, text: str) -> None:
        if not isinstance(self._open_item, kind):
            self._close_open("completed")
            self._open(kind)
        item = self._open_item
        item.content[0].text += text
        if isinstance(item, OutputMessage):
            self.text += text
        if text:
            delta = "output_text" if isinstance(item, OutputMessage) else "reasoning_text"
            extra = {"logprobs": _dumped(self._take_logprobs())} if isinstance(item, OutputMessage) else {}
            self._item_event(f"response.{delta}.delta", item, content_index=0, delta=text, **extra)

    def _take_logprobs(self) -> list[TokenLogprob]:
        logprobs, self.pending_logprobs = self.pending_logprobs, []
        return logprobs

    def _call(self, delta: DeltaToolCall) -> None:
        """A streamed tool-call delta: the first of a call opens its item, the rest grow its arguments."""
        if delta.id is not None:
            self._close_open("completed")
            item = FunctionCallItem(
                id=f"fc_{uuid.uuid4().hex}", call_id=delta.id, name=delta.function.name, arguments="",
                status="in_progress",
            )
            self._calls[delta.index] = item
            self._add_item(item)
        item = self._calls[delta.index]
        piece = delta.function.arguments if delta.function else None
        if piece:
            item.arguments += piece
            self._item_event("response.function_call_arguments.delta", item, delta=piece)

    def _open(self, kind: type) -> None:
        if kind is OutputMessage:
            item = OutputMessage(id=f"msg_{uuid.uuid4().hex}", status="in_progress", content=[])
            part = OutputText(text="")
        else:
            item = ReasoningItem(id=f"rs_{uuid.uuid4().hex}", status="in_progress", content=[])
            part = ReasoningText(text="")
        self._add_item(item)
        item.content.append(part)
        self._item_event("response.content_part.added", item, content_index=0, part=part)

    def _add_item(self, item: OutputItem) -> None:
        self.items.append(item)
        self._open_item = item
        self.events.append(self.event("response.output_item.added", output_index=len(self.items) - 1, item=item))

    def _close_open(self, status: str) -> None:
        item, self._open_item = self._open_item, None
        if item is None:
            return
        item.status = status
        if isinstance(item, FunctionCallItem):
            self._item_event("response.function_call_arguments.done", item, arguments=item.arguments)
        else:
            part = item.content[0]
            done = "output_text" if isinstance(item, OutputMessage) else "reasoning_text"
            extra = {"logprobs": _dumped(part.logprobs)} if isinstance(item, OutputMessage) else {}
            self._item_event(f"response.{done}.done", item, content_index=0, text=part.text, **extra)
            self._item_event("response.content_part.done", item, content_index=0, part=part)
        self.events.append(self.event("response.output_item.done", output_index=self.items.index(item), item=item))

    def _item_event(self, kind: str, item: OutputItem, **fields: Any) -> None:
        self.events.append(self.event(kind, output_index=self.items.index(item), item_id=item.id, **fields))


def _dumped(logprobs: list[TokenLogprob]) -> list[dict[str, Any]]:
    return [logprob.model_dump() for logprob in logprobs]


def _input_messages(items: str | list[InputItem]) -> list[ChatMessage]:
    if isinstance(items, str):
        return [ChatMessage(role="user", content=items)]
    if not items:
        raise OpenAIError("input must not be empty", param="input")
    messages: list[ChatMessage] = []
    for i, item in enumerate(items):
        kind = item.type or "message"
        if kind == "reasoning":
            continue  # earlier thinking does not go back to the model (as in vLLM)
        if kind == "function_call":
            _append_call(messages, _function_call(item, i))
        elif kind == "function_call_output":
            call_id = _required(item, "call_id", i)
            messages.append(ChatMessage(role="tool", tool_call_id=call_id, content=_parts_text(item.output, i)))
        elif kind == "message" and item.role:
            messages.append(ChatMessage(role=item.role, content=_parts_text(item.content, i)))
        else:
            raise OpenAIError(
                f"input[{i}] is a {kind!r} item{'' if item.role else ' without a role'}: only messages, "
                "function calls and their outputs are supported",
                param="input", code="unsupported_parameter" if kind != "message" else None,
            )
    return messages


def _function_call(item: InputItem, i: int) -> ToolCall:
    fields = {name: _required(item, name, i) for name in ("call_id", "name", "arguments")}
    return ToolCall(id=fields["call_id"], function=FunctionCall(name=fields["name"], arguments=fields["arguments"]))


def _append_call(messages: list[ChatMessage], call: ToolCall) -> None:
    """A call joins the assistant's message right before it (its text, or its other calls), as
    the chat history has them; a copy, since that message may be a stored response's."""
    last = messages[-1] if messages else None
    if last is not None and last.role == "assistant":
        messages[-1] = last.model_copy(update={"tool_calls": [*(last.tool_calls or []), call]})
    else:
        messages.append(ChatMessage(role="assistant", tool_calls=[call]))


def _required(item: InputItem, name: str, i: int) -> str:
    value = getattr(item, name)
    if not value:
        raise OpenAIError(f"input[{i}], a {item.type} item, needs {name}", param="input")
    return value


def _parts_text(content: str | list[InputContentPart] | None, i: int) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    for part in content:
        if part.type not in _TEXT_PARTS or part.text is None:
            raise OpenAIError(
                f"input[{i}] has a content part of type {part.type!r}: only text parts are supported",
                param="input", code="unsupported_parameter",
            )
    return "".join(part.text for part in content)


def _chat_request(request: ResponsesRequest, messages: list[ChatMessage], max_model_len: int) -> ChatCompletionRequest:
    instructions = [ChatMessage(role="system", content=request.instructions)] if request.instructions else []
    effort = request.reasoning.effort if request.reasoning else None
    logprobs = INCLUDE_LOGPROBS in (request.include or [])
    return ChatCompletionRequest(
        messages=instructions + messages, model=request.model, max_completion_tokens=request.max_output_tokens,
        temperature=request.temperature, top_p=request.top_p, top_k=request.top_k, min_p=request.min_p,
        repetition_penalty=request.repetition_penalty, seed=request.seed, stop=request.stop,
        ignore_eos=request.ignore_eos, logit_bias=request.logit_bias, skip_special_tokens=request.skip_special_tokens,
        include_stop_str_in_output=request.include_stop_str_in_output, stream=request.stream, user=request.user,
        chat_template_kwargs={"reasoning_effort": effort} if effort else None,
        tools=[ChatCompletionToolParam(function=FunctionDefinition(**tool.model_dump(exclude={"type"})))
               for tool in request.tools] if request.tools else None,
        tool_choice=_chat_tool_choice(request.tool_choice), response_format=_response_format(request.text),
        logprobs=logprobs, top_logprobs=request.top_logprobs if logprobs else None,
        truncate_prompt_tokens=_kept_tokens(request, max_model_len),
    )


def _kept_tokens(request: ResponsesRequest, max_model_len: int) -> int | None:
    """truncation "auto", as vLLM's: the prompt keeps its last tokens, as many as leave the context
    room for max_output_tokens (unset: for one token, where vLLM would leave none and refuse it);
    None: not truncated (a prompt past the context is refused)."""
    if request.truncation != "auto":
        return None
    return max(1, max_model_len - (request.max_output_tokens or 1))


def _chat_tool_choice(choice: ResponsesToolChoice | None) -> ToolChoice | None:
    if isinstance(choice, ToolChoiceFunction):
        return NamedToolChoice(function=NamedFunction(name=choice.name))
    return choice


def _response_format(text: TextConfig | None) -> dict[str, Any] | None:
    """text.format as the chat route's response_format (OpenAI's Responses API flattens
    json_schema's fields into the format)."""
    text_format = text.format if text is not None else None
    kind = (text_format or {}).get("type", "text")
    if kind in ("text", "json_object"):
        return None if kind == "text" else {"type": kind}
    if kind != "json_schema":
        raise OpenAIError(
            f"text.format type {kind!r} is not supported: use text, json_object or json_schema", param="text.format"
        )
    if not isinstance(text_format.get("name"), str) or not isinstance(text_format.get("schema"), dict):
        raise OpenAIError("text.format of type json_schema needs a name (a string) and a schema (an object)",
                          param="text.format")
    spec = {field: text_format.get(field) for field in ("name", "schema", "strict")}
    return {"type": "json_schema", "json_schema": spec}


def _renamed(error: OpenAIError) -> OpenAIError:
    """A chat-path error naming the Responses API's parameter."""
    if error.param is not None:
        error.param = _PARAMS.get(error.param.split(".")[0], error.param)
    return error


def _refuse_unsupported(request: ResponsesRequest) -> None:
    refuse_unsupported({"prompt": request.prompt, "max_tool_calls": request.max_tool_calls})
