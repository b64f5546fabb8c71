"""What the sampler reports of one position's logprobs: plain lists, read by the front end too
(which imports no torch)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TopLogprobs:
    """One position: the chosen token first, then the top-k, with their 1-based vocabulary ranks."""

    token_ids: list[int]
    logprobs: list[float]
    ranks: list[int]
