"""The token-proposer hook: what gives a request draft tokens for its next multi-token step.

The engine core (`EngineCore(config, model, proposer)`; offline `LLMEngine(config,
proposer)` passes it down) calls `propose` after every step's update with the running requests
whose tokens are all known and computed but the last one; the drafts it returns
are verified by the next step (pagoda/sample/acceptance.py), so a proposer only changes how many
tokens a step yields, never which. Without one passed in, the engine core builds the one that
`speculative_config` names (spec/ngram.py for `ngram`, spec/draft_model.py for `draft_model`,
spec/medusa.py for `medusa`: a HiddenStatesProposer, given the step's hidden states); with
neither, a step yields one token per request, as the code path without drafts always has."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from pagoda.core.request import Request


class TokenProposer(Protocol):
    # The most drafts `propose` gives one request: decode CUDA graphs are captured for 1 + this
    # many query tokens per request, and longer lists are cut to it.
    num_speculative_tokens: int

    def propose(self, requests: Sequence[Request]) -> dict[str, list[int]]:
        """Draft token ids (in the vocabulary) to follow each request's tokens so far, by request
        id; a request left out, or given [], decodes one token next step."""
        ...


@runtime_checkable
class ProposerWithKVCache(TokenProposer, Protocol):
    """A proposer with a KV pool of its own (a draft model's): the engine core sizes it with the
    target's from one memory budget, as many blocks each."""

    def kv_bytes_per_block(self) -> int: ...

    def allocate_kv_cache(self, num_blocks: int) -> None: ...


@dataclass
class SampleHiddenStates:
    """A step's final hidden states at its sample rows (on the target's device), and per request
    the row that sampled its last new token: what a head over the target's hidden states reads."""

    states: torch.Tensor  # [sample rows, hidden]
    rows: dict[str, int]


@runtime_checkable
class HiddenStatesProposer(Protocol):
    """A proposer from the target's hidden states (Medusa heads): the engine core gives it the
    last step's, and the model runner keeps them for it (config/speculative.py HIDDEN_STATES_METHODS)."""

    num_speculative_tokens: int

    def propose_from_hidden_states(
        self, requests: Sequence[Request], hidden: SampleHiddenStates
    ) -> dict[str, list[int]]:
        """As TokenProposer.propose; a request without a row in `hidden` gets no drafts."""
        ...
