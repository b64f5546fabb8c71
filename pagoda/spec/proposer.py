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
class ProposerWithKVCache(Protocol):
    """A proposer with a KV pool of its own (a draft model's, an EAGLE head's): the engine core
    sizes it with the target's from one memory budget, as many blocks each."""

    def kv_bytes_per_block(self) -> int: ...

    def allocate_kv_cache(self, num_blocks: int) -> None: ...


@dataclass
class StepHiddenStates:
    """A step's final hidden states (on the target's device; for EAGLE-3, its aux layers') and,
    per request it computed, the rows that hold its real tokens' states: what a head over the
    target's hidden states reads."""

    states: torch.Tensor  # [the step's tokens, hidden] (EAGLE-3: [the step's tokens, 3 x hidden])
    # request id -> (its first row, that row's position, how many rows from it hold real tokens:
    # the chunk's known tokens and accepted drafts, not rejected ones)
    rows: dict[str, tuple[int, int, int]]

    def last_row(self, request_id: str) -> int:
        """The row that sampled the request's last new token."""
        first, _, count = self.rows[request_id]
        return first + count - 1


@runtime_checkable
class HiddenStatesProposer(Protocol):
    """A proposer from the target's hidden states (Medusa heads): the engine core gives it the
    last step's, and the model runner keeps them for it (config/speculative.py HIDDEN_STATES_METHODS)."""

    num_speculative_tokens: int

    def propose_from_hidden_states(
        self, requests: Sequence[Request], hidden: StepHiddenStates
    ) -> dict[str, list[int]]:
        """As TokenProposer.propose; a request without a row in `hidden` gets no drafts."""
        ...
