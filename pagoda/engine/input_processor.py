"""The input side of the front end: the tokenizer and the engine's ResolvedConfig (model spec, EOS
ids, every default and rule), made once for the engine core; a user request turned into an EngineCoreRequest (n>1 fanned out into engine requests) after
the checks that need the model but no engine state (empty prompt, token ids and logit_bias keys
outside the vocabulary). What depends on the core's state (the prompt's length against
max_model_len and the KV pool) the core itself refuses."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pagoda.config import EngineConfig
from pagoda.config.resolve import resolve_config
from pagoda.engine.messages import EngineCoreRequest, EngineRequest
from pagoda.loader.model_loader import load_tokenizer
from pagoda.loader.model_resolver import resolve_model
from pagoda.sampling_params import SamplingParams


class InputProcessor:
    def __init__(self, args: EngineConfig) -> None:
        """Find the model, load its tokenizer and resolve the engine's configuration, once."""
        resolved = resolve_model(args.model, args.load_format)
        self.tokenizer: Any | None = None if args.skip_tokenizer_init else load_tokenizer(resolved, args.tokenizer)
        eos = None if self.tokenizer is None else self.tokenizer.eos_token_id
        self.config = resolve_config(args, resolved, tokenizer_eos_token_id=eos)
        self.vocab_size: int = self.config.model.spec.vocab_size

    def make_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> EngineCoreRequest:
        """The engine request(s) of one user request, or a ValueError naming what is wrong."""
        self._validate_prompt(prompt_token_ids)
        self._validate_logit_bias(params.logit_bias)
        return EngineCoreRequest(request_id, prompt_token_ids, fan_out(request_id, params))

    def _validate_prompt(self, prompt_token_ids: Sequence[int]) -> None:
        if len(prompt_token_ids) == 0:
            raise ValueError("the prompt is empty: at least one token is needed")
        bad = [t for t in prompt_token_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"prompt token ids {bad[:5]} are out of the vocabulary range [0, {self.vocab_size})")

    def _validate_logit_bias(self, logit_bias: dict[int, float] | None) -> None:
        # As vLLM: a bias on a token the model does not have is a mistake, not something to ignore.
        bad = sorted(t for t in logit_bias or () if t >= self.vocab_size)
        if bad:
            raise ValueError(f"logit_bias=<ids {bad[:5]}> is invalid: token ids must be in the vocabulary range [0, {self.vocab_size})")


def fan_out(request_id: str, params: SamplingParams) -> list[EngineRequest]:
    """n > 1 becomes n independent engine requests; they share the prompt's cached blocks."""
    if params.n == 1:
        return [(request_id, params)]
    return [(f"{i}_{request_id}", params.for_child(i)) for i in range(params.n)]
