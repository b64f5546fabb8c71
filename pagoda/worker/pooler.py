"""The runner's pooling step for embedding models: each prompt's final hidden states reduced to
one float32 vector (last token, mean, or first token), which a sequence-classification model's
head then makes its labels' logits. A pooling engine runs every prompt whole in one step
(config/resolve.py turns chunked prefill and the prefix cache off), so no request's hidden states
span steps. Truncation and normalization are the front end's (pagoda/pooling.py)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from pagoda.core.scheduler import ScheduledChunk


def pool(
    pooling_type: str, hidden: torch.Tensor, chunks: list[ScheduledChunk], starts: list[int],
    head: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> dict[str, list[float]]:
    """hidden: the step's final hidden states, one row per token; starts: each chunk's first row;
    head: a classifier's (pooled rows -> logits), None for an embedding model. Returns each
    request's vector."""
    vectors = []
    for chunk, first in zip(chunks, starts):
        assert chunk.start == 0 and chunk.samples, "a pooling engine runs each prompt whole"
        rows = hidden[first : first + chunk.num_tokens].float()
        if pooling_type == "MEAN":
            vectors.append(rows.mean(dim=0))
        elif pooling_type == "CLS":
            vectors.append(rows[0])
        else:  # LAST
            vectors.append(rows[-1])
    pooled = torch.stack(vectors)
    if head is not None:  # in the model's dtype, as transformers computes it
        pooled = head(pooled.to(hidden.dtype)).float()
    return {chunk.request.request_id: vector for chunk, vector in zip(chunks, pooled.tolist())}
