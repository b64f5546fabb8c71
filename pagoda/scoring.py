"""Scoring text pairs (vLLM's score and rerank APIs), for LLM.score and the server alike: which
texts pair up (one with N, or N with N), a cross-encoder's pair as its tokenizer encodes pairs,
and an embedding model's score of a pair, the cosine similarity of the two texts' embeddings (a
cross-encoder's is its one label's probability: pooling.probabilities)."""

from __future__ import annotations

import math
import operator
from typing import Any

from pagoda.pooling import float32s

_MIN_NORM = 1e-8  # torch.nn.functional.cosine_similarity's eps


def pair_indices(num_1: int, num_2: int, names: tuple[str, str]) -> list[tuple[int, int]]:
    """vLLM's pairing of two fields' texts: the first's one text with each of the second's (1 to
    N), or both pairwise (N to N); ValueError naming the field at fault (names: the fields')."""
    for count, name in zip((num_1, num_2), names):
        if count == 0:
            raise ValueError(f"{name}=[] is invalid: give at least one text")
    if num_1 == 1:
        return [(0, j) for j in range(num_2)]
    if num_1 != num_2:
        raise ValueError(
            f"{names[1]} has {num_2} texts for the {num_1} of {names[0]}: texts are scored one {names[0]} against "
            f"every {names[1]} (1 to N) or pairwise (N to N, as many of each)"
        )
    return [(i, i) for i in range(num_1)]


def encode_pair(tokenizer: Any, text_1: str, text_2: str, max_length: int | None) -> tuple[list[int], list[int] | None]:
    """A cross-encoder's input: the pair as its tokenizer encodes pairs (BERT: [CLS] text_1 [SEP]
    text_2 [SEP], token types 0 then 1; XLM-R: <s> text_1 </s></s> text_2 </s>), cut to
    max_length tokens as the tokenizer cuts pairs (the longer text first, as vLLM's); its token
    types, None when the tokenizer gives none."""
    encoded = tokenizer(text_1, text_2, truncation=max_length is not None, max_length=max_length)
    types = encoded.get("token_type_ids")
    return list(encoded["input_ids"]), None if types is None else list(types)


def cosine_score(pooled_1: list[float], pooled_2: list[float]) -> float:
    """Two texts' score on an embedding model: their vectors' cosine similarity (the same
    normalized or not; each norm at least 1e-8, as torch's cosine_similarity), a float32."""
    dot = math.fsum(map(operator.mul, pooled_1, pooled_2))
    return float32s([dot / (max(math.hypot(*pooled_1), _MIN_NORM) * max(math.hypot(*pooled_2), _MIN_NORM))])[0]
