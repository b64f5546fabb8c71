"""The `ngram` method (prompt lookup), as vLLM's NgramProposer: the drafts for a request are the
tokens that followed the earliest earlier occurrence of its longest suffix n-gram (n from
prompt_lookup_max down to prompt_lookup_min) in its own prompt and output. Host-side numpy over
token ids the engine already holds: no device work, no sync."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from pagoda.config.groups import SpeculativeConfig
from pagoda.core.request import Request


def lookup_drafts(token_ids: Sequence[int], min_n: int, max_n: int, k: int) -> list[int]:
    """Up to k tokens that followed the earliest earlier occurrence of the longest suffix of
    token_ids whose length is in [min_n, max_n]; [] when no such n-gram occurred before."""
    tokens = np.asarray(token_ids, dtype=np.int64)
    total = len(tokens)
    for n in range(min(max_n, total - 1), min_n - 1, -1):
        # Windows of tokens[:-1] start before the suffix itself does.
        windows = sliding_window_view(tokens[:-1], n)
        starts = np.flatnonzero((windows == tokens[total - n :]).all(axis=1))
        if starts.size:
            follow = int(starts[0]) + n
            return tokens[follow : follow + k].tolist()
    return []


class NgramProposer:
    """A TokenProposer (spec/proposer.py) for the `ngram` method."""

    def __init__(self, config: SpeculativeConfig) -> None:
        self.num_speculative_tokens = config.num_speculative_tokens
        self.min_n = config.prompt_lookup_min
        self.max_n = config.prompt_lookup_max

    def propose(self, requests: Sequence[Request]) -> dict[str, list[int]]:
        drafts = {}
        for req in requests:
            found = lookup_drafts(req.token_ids, self.min_n, self.max_n, self.num_speculative_tokens)
            if found:
                drafts[req.request_id] = found
        return drafts
