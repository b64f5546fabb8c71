"""POST /v1/responses (OpenAI's Responses API) and GET /v1/responses/{id}. The instructions, a stored
earlier response's conversation (previous_response_id) and the input become chat messages that
take the chat route's own path (template, sampling, one engine request); the reply comes back as
output items (the thinking, with --reasoning-parser, then the message), whole or as OpenAI's typed
server-sent events."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

from pagoda.outputs import CompletionOutput

from .protocol import ChatCompletionRequest, ChatMessage
from .protocol_responses import (
    IncompleteDetails, InputItem, OutputItem, OutputMessage, OutputText, ReasoningItem, ReasoningText,
    ResponseObject, ResponsesRequest, ResponseUsage,
)
from .reasoning import ReasoningSplitter
from .response_store import ResponseStore
from .serving_chat import ChatRun, OpenAIServingChat
from .serving_engine import OpenAIError, as_openai_error, merge, refuse_unsupported

# A chat request's parameters under the names the Responses API gives them.
_PARAMS = {"messages": "input", "max_tokens": "max_output_tokens", "max_completion_tokens": "max_output_tokens"}
_TEXT_PARTS = ("input_text", "output_text", "text")


class OpenAIServingResponses:
    def __init__(self, chat: OpenAIServingChat, store: ResponseStore) -> None:
        self.chat, self.store = chat, store

    async def create(self, request: ResponsesRequest) -> ResponseObject | AsyncIterator[str]:
        _refuse_unsupported(request)
        history = self._history(request.previous_response_id)
        messages = history + _input_messages(request.input)
        chat_request = _chat_request(request, messages)
        try:
            run = await self.chat.start(chat_request, "resp")
        except OpenAIError as error:
            raise _renamed(error) from None
        splitter = self.chat.splitter(chat_request)
        if request.stream:
            return self._stream(request, run, messages, splitter)
        try:
            final = None
            async for _, output in merge([run.outputs]):
                final = output
        finally:
            self.chat.engine.abort(run.ids)
        child = final.outputs[0]
        output = _Output()
        output.add(*(splitter.split(child.text) if splitter else ("", child.text)))
        return self._finish(request, run, messages, output, child)

    def retrieve(self, response_id: str) -> ResponseObject:
        stored = self.store.get(response_id)
        if stored is None:
            raise OpenAIError(f"Response with id '{response_id}' not found.", 404, param="response_id",
                              code="response_not_found")
        return stored.response

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

    async def _stream(
        self, request: ResponsesRequest, run: ChatRun, messages: list[ChatMessage], splitter: ReasoningSplitter | None,
    ) -> AsyncIterator[str]:
        """The response's events; an error once they have begun is an `error` event (OpenAI's),
        and the engine request is aborted however the stream ends."""
        output = _Output()
        try:
            started = self._response(request, run, "in_progress")
            yield output.event("response.created", response=started)
            yield output.event("response.in_progress", response=started)
            async for _, result in merge([run.outputs]):
                child = result.outputs[0]
                reasoning, content = splitter.feed(child.text_delta) if splitter else ("", child.text_delta)
                if child.finish_reason is not None and splitter:
                    rest_reasoning, rest_content = splitter.finish()
                    reasoning, content = reasoning + rest_reasoning, content + rest_content
                for event in output.add(reasoning, content):
                    yield event
            final = self._finish(request, run, messages, output, child)
            for event in output.events:
                yield event
            yield output.event(f"response.{final.status}", response=final)
        except Exception as error:
            failure = as_openai_error(error)
            yield output.event("error", code=failure.code, message=str(failure), param=failure.param)
        finally:
            self.chat.engine.abort(run.ids)

    def _finish(
        self, request: ResponsesRequest, run: ChatRun, messages: list[ChatMessage], output: _Output,
        child: CompletionOutput,
    ) -> ResponseObject:
        """The whole response once the output has ended (kept when the request asks it to be)."""
        incomplete = child.finish_reason == "length"
        output.close("incomplete" if incomplete else "completed")
        output_tokens = len(child.token_ids)
        response = self._response(
            request, run, "incomplete" if incomplete else "completed", output=output.items,
            usage=ResponseUsage(input_tokens=run.prompt_tokens, output_tokens=output_tokens,
                                total_tokens=run.prompt_tokens + output_tokens),
            incomplete_details=IncompleteDetails(reason="max_output_tokens") if incomplete else None,
        )
        if request.store:
            self.store.put(response, messages + [ChatMessage(role="assistant", content=output.text)])
        return response

    def _response(self, request: ResponsesRequest, run: ChatRun, status: str, **fields: Any) -> ResponseObject:
        return ResponseObject(
            id=run.request_id, status=status, model=self.chat.model_name, instructions=request.instructions,
            max_output_tokens=request.max_output_tokens, previous_response_id=request.previous_response_id,
            temperature=request.temperature, top_p=request.top_p, store=request.store and self.store.enabled,
            metadata=request.metadata, user=request.user, reasoning=request.reasoning,
            parallel_tool_calls=request.parallel_tool_calls, **fields,
        )


class _Output:
    """A response's output items (its thinking, then its message), grown as text arrives, with
    the stream events that open, grow and close them, numbered in order."""

    def __init__(self) -> None:
        self.items: list[OutputItem] = []
        self.events: list[str] = []  # those not yet handed out
        self.text = ""  # the message's
        self.sequence_number = 0

    def event(self, kind: str, **fields: Any) -> str:
        payload = {"type": kind, "sequence_number": self.sequence_number, **{
            name: value.model_dump(exclude_none=True) if hasattr(value, "model_dump") else value
            for name, value in fields.items()
        }}
        self.sequence_number += 1
        return f"event: {kind}\ndata: {json.dumps(payload)}\n\n"

    def add(self, reasoning: str, content: str) -> list[str]:
        """The events of a piece of thinking and a piece of the message; returns those so far."""
        if reasoning:
            self._grow(ReasoningItem, reasoning)
        if content:
            self._grow(OutputMessage, content)
        events, self.events = self.events, []
        return events

    def close(self, status: str) -> None:
        """End the output: every response has a message, if an empty one."""
        if not self.items or not isinstance(self.items[-1], OutputMessage):
            self._grow(OutputMessage, "")
        self.items[-1].status = status
        self._close(self.items[-1])

    def _grow(self, kind: type, text: str) -> None:
        if not self.items or not isinstance(self.items[-1], kind):
            if self.items:
                self.items[-1].status = "completed"
                self._close(self.items[-1])
            self._open(kind)
        item = self.items[-1]
        item.content[0].text += text
        if isinstance(item, OutputMessage):
            self.text += text
        if text:
            delta = "output_text" if isinstance(item, OutputMessage) else "reasoning_text"
            extra = {"logprobs": []} if isinstance(item, OutputMessage) else {}
            self._item_event(f"response.{delta}.delta", item, content_index=0, delta=text, **extra)

    def _open(self, kind: type) -> None:
        if kind is OutputMessage:
            item = OutputMessage(id=f"msg_{uuid.uuid4().hex}", status="in_progress", content=[])
            part = OutputText(text="")
        else:
            item = ReasoningItem(id=f"rs_{uuid.uuid4().hex}", status="in_progress", content=[])
            part = ReasoningText(text="")
        self.items.append(item)
        self.events.append(self.event("response.output_item.added", output_index=len(self.items) - 1, item=item))
        item.content.append(part)
        self._item_event("response.content_part.added", item, content_index=0, part=part)

    def _close(self, item: OutputItem) -> None:
        part = item.content[0]
        done = "output_text" if isinstance(item, OutputMessage) else "reasoning_text"
        extra = {"logprobs": []} if isinstance(item, OutputMessage) else {}
        self._item_event(f"response.{done}.done", item, content_index=0, text=part.text, **extra)
        self._item_event("response.content_part.done", item, content_index=0, part=part)
        self.events.append(self.event("response.output_item.done", output_index=self.items.index(item), item=item))

    def _item_event(self, kind: str, item: OutputItem, **fields: Any) -> None:
        self.events.append(self.event(kind, output_index=self.items.index(item), item_id=item.id, **fields))


def _input_messages(items: str | list[InputItem]) -> list[ChatMessage]:
    if isinstance(items, str):
        return [ChatMessage(role="user", content=items)]
    if not items:
        raise OpenAIError("input must not be empty", param="input")
    messages = []
    for i, item in enumerate(items):
        kind = item.type or "message"
        if kind == "reasoning":
            continue  # earlier thinking does not go back to the model (as in vLLM)
        if kind != "message" or not item.role:
            raise OpenAIError(
                f"input[{i}] is a {kind!r} item{'' if item.role else ' without a role'}: only messages are supported",
                param="input", code="unsupported_parameter" if kind != "message" else None,
            )
        messages.append(ChatMessage(role=item.role, content=_item_text(item, i)))
    return messages


def _item_text(item: InputItem, i: int) -> str:
    if item.content is None or isinstance(item.content, str):
        return item.content or ""
    for part in item.content:
        if part.type not in _TEXT_PARTS or part.text is None:
            raise OpenAIError(
                f"input[{i}] has a content part of type {part.type!r}: only text parts are supported",
                param="input", code="unsupported_parameter",
            )
    return "".join(part.text for part in item.content)


def _chat_request(request: ResponsesRequest, messages: list[ChatMessage]) -> ChatCompletionRequest:
    instructions = [ChatMessage(role="system", content=request.instructions)] if request.instructions else []
    effort = request.reasoning.effort if request.reasoning else None
    return ChatCompletionRequest(
        messages=instructions + messages, model=request.model, max_completion_tokens=request.max_output_tokens,
        temperature=request.temperature, top_p=request.top_p, top_k=request.top_k, min_p=request.min_p,
        repetition_penalty=request.repetition_penalty, seed=request.seed, stop=request.stop,
        ignore_eos=request.ignore_eos, logit_bias=request.logit_bias, skip_special_tokens=request.skip_special_tokens,
        include_stop_str_in_output=request.include_stop_str_in_output, stream=request.stream, user=request.user,
        chat_template_kwargs={"reasoning_effort": effort} if effort else None,
    )


def _renamed(error: OpenAIError) -> OpenAIError:
    """A chat-path error naming the Responses API's parameter."""
    if error.param is not None:
        error.param = _PARAMS.get(error.param.split(".")[0], error.param)
    return error


def _refuse_unsupported(request: ResponsesRequest) -> None:
    text_format = (request.text.format or {}).get("type", "text") if request.text else "text"
    refuse_unsupported({
        "tools": request.tools or None,
        "tool_choice": None if request.tool_choice in (None, "auto", "none") else request.tool_choice,
        "text": None if text_format == "text" else request.text,
        "include": request.include or None,
        "background": request.background or None,
        "prompt": request.prompt,
        "truncation": None if request.truncation in (None, "disabled") else request.truncation,
        "top_logprobs": request.top_logprobs or None,
        "max_tool_calls": request.max_tool_calls,
    })
