"""A proposer for measuring speculative decoding at a controlled acceptance rate (random weights
make a real proposer's acceptance meaningless): it replays each request's own greedy
continuation, computed by a run without speculation, with each draft token corrupted (changed
to another token) with probability 1 - alpha. A greedy request then accepts draft i of a step
with probability alpha^i, so a step yields 1 + alpha + ... + alpha^k tokens on average. For
benchmarks and tests only: it needs to know the output in advance."""

from __future__ import annotations

import random
from collections.abc import Sequence

from pagoda.core.request import Request


class ReplayProposer:
    """A TokenProposer (spec/proposer.py) over known futures: request id -> its greedy output."""

    def __init__(self, futures: dict[str, list[int]], alpha: float, k: int, vocab_size: int, seed: int = 0) -> None:
        self.futures = futures
        self.alpha = alpha
        self.num_speculative_tokens = k
        self.vocab_size = vocab_size
        self._rng = random.Random(seed)

    def propose(self, requests: Sequence[Request]) -> dict[str, list[int]]:
        drafts = {}
        for req in requests:
            future = self.futures.get(req.request_id)
            if future is None:
                continue
            done = req.num_output_tokens
            drafts[req.request_id] = [self._corrupted(t) for t in future[done : done + self.num_speculative_tokens]]
        return drafts

    def _corrupted(self, token: int) -> int:
        if self._rng.random() < self.alpha:
            return token
        return (token + self._rng.randrange(1, self.vocab_size)) % self.vocab_size
