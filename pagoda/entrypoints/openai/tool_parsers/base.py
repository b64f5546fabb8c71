"""What every tool-call parser shares: a parser only finds where the calls are in the model's
text (`scan`); turning that into whole `tool_calls` or into streamed deltas is done here, once.

`scan` must be prefix-stable: for a text and any continuation of it, the content and each call's
name and argument text found in the shorter text are prefixes of (or equal to) those found in the
longer one. Streaming then only sends what is new since the previous scan."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ..protocol import DeltaFunctionCall, DeltaToolCall, FunctionCall, ToolCall


@dataclass
class PartialCall:
    """One tool call as far as the text goes: its name once the name is whole, the raw JSON text
    of its arguments so far, and whether the call has ended."""

    name: str | None
    arguments: str | None
    complete: bool


@dataclass
class Scan:
    """A model text split into content (to the client as `content`) and tool calls."""

    content: str
    calls: list[PartialCall] = field(default_factory=list)


@dataclass
class ExtractedToolCalls:
    content: str | None
    tool_calls: list[ToolCall]


class ToolParser:
    """A model family's tool-call format. Subclasses set `name` (the --tool-call-parser value)
    and implement `scan`; `final` tells it that the text will not grow (no partial marker to
    hold back)."""

    name: ClassVar[str]
    # Whether the format's markers may be special tokens that the detokenizer would drop.
    keeps_special_tokens: ClassVar[bool] = False

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    def scan(self, text: str, final: bool) -> Scan:
        raise NotImplementedError

    def new_call_id(self) -> str:
        return f"chatcmpl-tool-{uuid.uuid4().hex}"

    def extract(self, text: str) -> ExtractedToolCalls:
        """The tool calls of a whole text; a text whose calls do not parse is all content, as in vLLM."""
        scan = self.scan(text, final=True)
        calls = [self._whole_call(call) for call in scan.calls]
        if not calls or None in calls:
            return ExtractedToolCalls(content=text, tool_calls=[])
        return ExtractedToolCalls(content=scan.content or None, tool_calls=calls)

    def _whole_call(self, call: PartialCall) -> ToolCall | None:
        if not call.complete or call.name is None or call.arguments is None:
            return None
        try:
            arguments = json.loads(call.arguments)
        except ValueError:
            return None
        return ToolCall(
            id=self.new_call_id(),
            function=FunctionCall(name=call.name, arguments=json.dumps(arguments, ensure_ascii=False)),
        )


class ToolCallStream:
    """One choice's streamed text as OpenAI streams tool calls: content deltas, then per call a
    first delta with its id, type and name, then pieces of its arguments text."""

    def __init__(self, parser: ToolParser) -> None:
        self.parser = parser
        self._sent_content = 0
        self._sent_arguments: list[str] = []  # per call whose name has been sent

    @property
    def called(self) -> bool:
        return bool(self._sent_arguments)

    def step(self, text: str, final: bool) -> tuple[str | None, list[DeltaToolCall]]:
        """What to send now that the choice's text is `text`: new content, new tool-call deltas."""
        scan = self.parser.scan(text, final)
        content = scan.content[self._sent_content:] or None
        self._sent_content = max(self._sent_content, len(scan.content))
        deltas: list[DeltaToolCall] = []
        for index, call in enumerate(scan.calls):
            if index == len(self._sent_arguments):
                if call.name is None:
                    break  # a call's name goes out whole, before its arguments
                self._sent_arguments.append("")
                deltas.append(DeltaToolCall(
                    index=index, id=self.parser.new_call_id(), type="function",
                    function=DeltaFunctionCall(name=call.name, arguments=""),
                ))
            piece = self._arguments_piece(index, call.arguments or "")
            if piece:
                deltas.append(DeltaToolCall(index=index, function=DeltaFunctionCall(arguments=piece)))
        return content, deltas

    def _arguments_piece(self, index: int, arguments: str) -> str:
        sent = self._sent_arguments[index]
        if len(arguments) <= len(sent) or not arguments.startswith(sent):
            return ""
        self._sent_arguments[index] = arguments
        return arguments[len(sent):]
