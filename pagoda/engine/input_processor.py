"""The input side of the front end: the model's config, the tokenizer and the EOS ids, resolved
once for the engine core (with the vocabulary as the grammar compiler needs it); a user request
turned into an EngineCoreRequest (n>1 fanned out into engine requests) after the checks that need
the model but no engine state (empty prompt, token ids and logit_bias keys outside the
vocabulary, a structured-output constraint that does not parse). What depends on the core's
state (the prompt's length against max_model_len and the KV pool) the core itself refuses."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from pagoda.config import EngineConfig
from pagoda.engine.core_model import CoreModel
from pagoda.engine.messages import EngineCoreRequest, EngineRequest
from pagoda.loader.model_loader import (
    load_generation_eos,
    load_hf_config,
    load_tokenizer,
)
from pagoda.loader.model_resolver import resolve_model
from pagoda.loader.plain_config import plain_config
from pagoda.sampling_params import SamplingParams
from pagoda.structured_output.grammar import check as check_structured_outputs
from pagoda.structured_output.grammar import grammar_vocab


class InputProcessor:
    def __init__(self, config: EngineConfig) -> None:
        resolved = resolve_model(config.model, config.load_format)
        hf_config = load_hf_config(resolved)
        self.tokenizer: Any | None = None if config.skip_tokenizer_init else load_tokenizer(resolved, config.tokenizer)
        self.vocab_size: int = hf_config.vocab_size
        eos_token_ids = _eos_token_ids(load_generation_eos(resolved), hf_config, self.tokenizer)
        vocab = None if self.tokenizer is None else grammar_vocab(self.tokenizer, self.vocab_size, eos_token_ids)
        self.core_model = CoreModel(resolved, plain_config(hf_config), eos_token_ids, vocab)

    def make_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> EngineCoreRequest:
        """The engine request(s) of one user request, or a ValueError naming what is wrong."""
        self._validate_prompt(prompt_token_ids)
        self._validate_logit_bias(params.logit_bias)
        if params.structured_outputs is not None:
            check_structured_outputs(params.structured_outputs)
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
    return [
        (f"{i}_{request_id}", dataclasses.replace(params, n=1, seed=None if params.seed is None else params.seed + i))
        for i in range(params.n)
    ]


def _eos_token_ids(generation_eos: set[int], hf_config: Any, tokenizer: Any | None) -> frozenset[int]:
    """generation_config.json's EOS ids, the model config's and the tokenizer's."""
    ids = set(generation_eos)
    declared = getattr(hf_config, "eos_token_id", None)
    ids.update([declared] if isinstance(declared, int) else declared or [])
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return frozenset(ids)
