"""Incremental detokenization with stop strings.

Text comes from the tokenizers library's DecodeStream, which holds a token back until it forms
whole UTF-8 characters (byte-fallback and byte-level tokenizers split characters across tokens),
so no U+FFFD fragment ever reaches a client. The stream is primed with the end of the prompt so
that the first generated token gets its leading space right."""

from __future__ import annotations

from typing import Any

from tokenizers.decoders import DecodeStream

from pagoda.sampling_params import SamplingParams

# Enough prompt context for a leading space or a merged byte sequence to decode as it would in place.
_PRIME_TOKENS = 6


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Any, prompt_token_ids: list[int], params: SamplingParams) -> None:
        self.backend = tokenizer.backend_tokenizer
        self.params = params
        self.stream = DecodeStream(skip_special_tokens=params.skip_special_tokens)
        for token_id in prompt_token_ids[-_PRIME_TOKENS:]:
            self.stream.step(self.backend, token_id)
        self.output_text = ""
        self._stop_checked = 0  # text before this offset holds no stop string
        self._taken = 0  # text before this offset was returned by take_delta
        self._max_stop_len = max((len(s) for s in params.stop), default=0)

    def append(self, new_token_ids: list[int], num_output_tokens: int) -> str | None:
        """Decode new tokens; returns the stop string that matched (the text is then cut), else None.

        Stop strings count only once num_output_tokens >= min_tokens."""
        for token_id in new_token_ids:
            piece = self.stream.step(self.backend, token_id)
            if piece:
                self.output_text += piece
        if not self.params.stop:
            return None
        if num_output_tokens < self.params.min_tokens:
            self._stop_checked = len(self.output_text)  # text before min_tokens never stops
            return None
        return self._check_stop()

    def _check_stop(self) -> str | None:
        # A match may straddle old and new text: look back len(longest stop) - 1 characters.
        start = max(0, self._stop_checked - self._max_stop_len + 1)
        found: tuple[int, str] | None = None
        for stop in self.params.stop:
            index = self.output_text.find(stop, start)
            if index != -1 and (found is None or index < found[0]):
                found = (index, stop)
        self._stop_checked = len(self.output_text)
        if found is None:
            return None
        index, stop = found
        end = index + len(stop) if self.params.include_stop_str_in_output else index
        self.output_text = self.output_text[:end]
        return stop

    def take_delta(self, finished: bool) -> str:
        """Text not taken yet, holding back a tail that could still grow into a stop string."""
        end = len(self.output_text)
        if not finished and self._max_stop_len > 1:
            end = max(self._taken, end - (self._max_stop_len - 1))
        delta = self.output_text[self._taken : end]
        self._taken = end
        return delta


def decode_token(tokenizer: Any, token_id: int) -> str:
    """The text of one token, as logprobs show it."""
    return tokenizer.decode([token_id])
