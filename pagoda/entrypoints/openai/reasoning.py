"""--reasoning-parser: a reasoning model's thinking (the text between <think> and </think>) split
from its answer, as vLLM's deepseek_r1 and qwen3 parsers split it, on a whole text or piece by
piece as it streams."""

from __future__ import annotations

from typing import Any

REASONING_PARSERS = ("deepseek_r1", "qwen3")
_START, _END = "<think>", "</think>"


class ReasoningSplitter:
    """Splits one choice's output, fed in pieces, into (reasoning, content) pieces. The thinking
    comes first: the chat template may have opened <think> in the prompt, so the output need not
    hold it (when it does, it is dropped); </think> ends the thinking, and everything after it is
    content. A piece's end that may be the start of a tag is held back until the next piece (or
    finish) shows whether it is one."""

    def __init__(self, thinking: bool = True) -> None:
        self.in_reasoning = thinking
        self.start_seen = False
        self.held = ""

    def feed(self, text: str) -> tuple[str, str]:
        text, self.held = self.held + text, ""
        if not self.in_reasoning:
            return "", text
        end = text.find(_END)
        if not self.start_seen:
            start = text.find(_START)
            if start >= 0 and (end < 0 or start < end):
                self.start_seen = True
                text = text[:start] + text[start + len(_START):]
                end = text.find(_END)
        if end >= 0:
            self.in_reasoning = False
            return text[:end], text[end + len(_END):]
        keep = _tag_prefix_length(text, (_END,) if self.start_seen else (_START, _END))
        self.held = text[len(text) - keep:]
        return text[:len(text) - keep], ""

    def finish(self) -> tuple[str, str]:
        """What was held back: no tag after all."""
        held, self.held = self.held, ""
        return (held, "") if self.in_reasoning else ("", held)

    def split(self, text: str) -> tuple[str, str]:
        """A whole output's (reasoning, content)."""
        reasoning, content = self.feed(text)
        rest_reasoning, rest_content = self.finish()
        return reasoning + rest_reasoning, content + rest_content


def reasoning_splitter(parser: str | None, template_kwargs: dict[str, Any] | None) -> ReasoningSplitter | None:
    """A splitter for one choice of a request, or None without --reasoning-parser. Qwen3's
    template skips the thinking when the request sets enable_thinking to false: its output is
    then all content."""
    if parser is None:
        return None
    thinking = parser != "qwen3" or bool((template_kwargs or {}).get("enable_thinking", True))
    return ReasoningSplitter(thinking)


def _tag_prefix_length(text: str, tags: tuple[str, ...]) -> int:
    """The length of the longest end of text that a tag starts with (shorter than the tag)."""
    for length in range(min(len(text), max(map(len, tags)) - 1), 0, -1):
        if any(tag.startswith(text[-length:]) for tag in tags):
            return length
    return 0
