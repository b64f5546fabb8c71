"""Incremental detokenization with stop strings, one IncrementalDetokenizer per request.

Text comes from the tokenizers library's DecodeStream, which holds tokens back until they form
whole UTF-8 characters (byte-fallback and byte-level tokenizers split characters across tokens),
so no U+FFFD fragment of a valid character ever reaches a client. The stream is first fed the end
of the prompt, so that the first generated token decodes as it does in place (its leading space:
sentencepiece strips one at the start of a text) and completes a character the prompt began.
Tokenizers without a tokenizers backend go through the same algorithm over tokenizer.decode.
spaces_between_special_tokens has no effect: tokenizers' decoders insert no such spaces.

Stop strings are searched in the new text plus the len(stop) - 1 characters before it, so the
work per token stays proportional to the new text; take_delta holds back only a tail that some
stop string begins with, so no text a client has seen is ever cut."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, Protocol

from tokenizers.decoders import DecodeStream

from pagoda.sampling_params import SamplingParams

_REPLACEMENT = "\ufffd"
# How many prompt tokens prime the stream: at least the first, extended towards the second
# until the window starts on a character boundary.
_MIN_CONTEXT, _MAX_CONTEXT = 4, 24


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Any, prompt_token_ids: list[int], params: SamplingParams) -> None:
        self.params = params
        self.output_text = ""  # all text so far, cut at a stop string
        self._stream = (
            _open_stream(tokenizer, prompt_token_ids, params.skip_special_tokens) if params.detokenize else None
        )
        self._checked = 0  # no stop string ends at or before this offset
        self._taken = 0  # text before this offset was returned by take_delta
        self._max_stop_len = max(map(len, params.stop), default=0)

    def append(self, new_token_ids: list[int], num_output_tokens: int) -> str | None:
        """Decode new tokens; return the stop string that matched (the text is then cut), else None.

        Stop strings are only checked once num_output_tokens (new tokens included) >= min_tokens."""
        if self._stream is None:
            return None
        pieces = [self._stream.step(token_id) for token_id in new_token_ids]
        self.output_text += "".join(piece for piece in pieces if piece)
        if num_output_tokens < self.params.min_tokens:
            # A stop string must end in text decoded once min_tokens is reached.
            self._checked = len(self.output_text)
            return None
        return self._find_stop()

    def take_delta(self, finished: bool) -> str:
        """Text not taken yet, holding back a tail that could still become a stop string
        (all of it when finished)."""
        end = len(self.output_text)
        if not finished:
            end -= self._possible_stop_len()
        delta = self.output_text[self._taken : end]
        self._taken = end
        return delta

    def _find_stop(self) -> str | None:
        # Only matches ending in the new text: earlier ones were ruled out already. Each search
        # starts len(stop) - 1 characters back, so the work stays proportional to the new text.
        text = self.output_text
        match: tuple[int, str] | None = None
        for stop in self.params.stop:
            index = text.find(stop, max(0, self._checked - len(stop) + 1))
            if index != -1 and (match is None or index < match[0]):
                match = (index, stop)
        self._checked = len(text)
        if match is None:
            return None
        index, stop = match
        self.output_text = text[: index + len(stop) if self.params.include_stop_str_in_output else index]
        return stop

    def _possible_stop_len(self) -> int:
        """Length of the longest untaken tail that some stop string starts with."""
        text = self.output_text
        for length in range(min(self._max_stop_len - 1, len(text) - self._taken), 0, -1):
            tail = text[-length:]
            if any(stop.startswith(tail) for stop in self.params.stop):
                return length
        return 0


def decode_token(tokenizer: Any, token_id: int) -> str:
    """The text of one token on its own, special tokens included (for logprobs)."""
    return tokenizer.decode([token_id], skip_special_tokens=False)


class _Stream(Protocol):
    def step(self, token_id: int) -> str | None: ...


def _open_stream(tokenizer: Any, prompt_token_ids: list[int], skip_special_tokens: bool) -> _Stream:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    stream: _Stream
    if backend is None:
        stream, decoder = _WindowStream(tokenizer, skip_special_tokens), tokenizer
    else:
        stream, decoder = _FastStream(backend, skip_special_tokens), backend
    decode = functools.partial(decoder.decode, skip_special_tokens=skip_special_tokens)
    # Stepping through the context (rather than DecodeStream(ids=...)) leaves a character the
    # prompt ends in the middle of pending, to be completed by the first output tokens.
    for token_id in _prompt_context(prompt_token_ids, decode):
        stream.step(token_id)
    return stream


def _prompt_context(prompt_token_ids: list[int], decode: Callable[[list[int]], str]) -> list[int]:
    """The last few prompt tokens, starting on a character boundary where one is near."""
    for length in range(_MIN_CONTEXT, min(_MAX_CONTEXT, len(prompt_token_ids)) + 1):
        context = prompt_token_ids[-length:]
        if not decode(context).startswith(_REPLACEMENT):
            return context
    return prompt_token_ids[-_MIN_CONTEXT:]


class _FastStream:
    """tokenizers' DecodeStream, restarted if invalid UTF-8 from the model trips it."""

    def __init__(self, backend: Any, skip_special_tokens: bool) -> None:
        self._backend = backend
        self._skip_special_tokens = skip_special_tokens
        self._stream = DecodeStream(skip_special_tokens=skip_special_tokens)

    def step(self, token_id: int) -> str | None:
        try:
            return self._stream.step(self._backend, token_id)
        except Exception as error:  # tokenizers raises a bare Exception
            # Replacement characters for invalid bytes can make the decoded window shrink, which
            # DecodeStream cannot recover from (vLLM #17448): start over from this token.
            if not str(error).startswith("Invalid prefix"):
                raise
            self._stream = DecodeStream(skip_special_tokens=self._skip_special_tokens)
            return self._stream.step(self._backend, token_id)


class _WindowStream:
    """DecodeStream's algorithm over tokenizer.decode, for tokenizers without a tokenizers backend:
    decode the last emitted chunk's tokens plus the pending ones and emit what the text grew by,
    once it does not end in a replacement character."""

    def __init__(self, tokenizer: Any, skip_special_tokens: bool) -> None:
        self._decode = functools.partial(tokenizer.decode, skip_special_tokens=skip_special_tokens)
        self._emitted: list[int] = []
        self._pending: list[int] = []
        self._prefix = ""  # the text of self._emitted

    def step(self, token_id: int) -> str | None:
        self._pending.append(token_id)
        prefix = self._prefix
        text = self._decode(self._emitted + self._pending)
        if len(text) <= len(prefix) or text.endswith(_REPLACEMENT):
            return None
        if not text.startswith(prefix):  # as _FastStream: start over from the pending tokens
            prefix, text = "", self._decode(self._pending)
        self._emitted, self._pending = self._pending, []
        self._prefix = self._decode(self._emitted)
        return text[len(prefix) :]
