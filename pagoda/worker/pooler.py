"""The runner's pooling step for embedding models: each prompt's final hidden states reduced to
one float32 vector (last token, mean, or first token). A pooling engine runs every prompt whole
in one step (config/resolve.py turns chunked prefill and the prefix cache off), so no request's
hidden states span steps. Truncation and normalization are the front end's (pagoda/pooling.py)."""

from __future__ import annotations

import torch

from pagoda.core.scheduler import ScheduledChunk


def pool(
    pooling_type: str, hidden: torch.Tensor, chunks: list[ScheduledChunk], starts: list[int]
) -> dict[str, list[float]]:
    """hidden: the step's final hidden states, one row per token; starts: each chunk's first row.
    Returns each request's vector."""
    pooled: dict[str, list[float]] = {}
    for chunk, first in zip(chunks, starts):
        assert chunk.start == 0 and chunk.samples, "a pooling engine runs each prompt whole"
        rows = hidden[first : first + chunk.num_tokens].float()
        if pooling_type == "MEAN":
            vector = rows.mean(dim=0)
        elif pooling_type == "CLS":
            vector = rows[0]
        else:  # LAST
            vector = rows[-1]
        pooled[chunk.request.request_id] = vector.tolist()
    return pooled
