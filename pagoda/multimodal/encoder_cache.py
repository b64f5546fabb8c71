"""The runner's side of images: each scheduled prompt chunk's image features, merged into the
token embeddings at its placeholder rows. An image is encoded once, when the first chunk that
covers any of its placeholders runs; its features are kept for the request's later chunks (a
chunked prefill does not re-encode) and dropped once the chunk that covers its last placeholder
has run, or when the request is not scheduled in a step (preempted or gone: a later chunk encodes
it again)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from pagoda.multimodal.inputs import ImageInput

# An image's encoder output: [its placeholder count, hidden size].
Encoder = Callable[[ImageInput], torch.Tensor]


class EncoderCache:
    def __init__(self) -> None:
        self._features: dict[str, dict[int, torch.Tensor]] = {}  # request id -> image index -> features
        self.num_encoded = 0  # images encoded so far (tests read it: a chunked prefill encodes once)

    def step_features(
        self, chunks: Sequence[tuple[str, Sequence[ImageInput], int, int, int]], encode: Encoder
    ) -> tuple[list[int], torch.Tensor] | None:
        """For chunks (request id, its images, first position, token count, first row in the
        batch): the batch rows of image placeholders and their features, row order kept; None
        when no chunk covers an image."""
        scheduled = {rid for rid, *_ in chunks}
        for rid in [rid for rid in self._features if rid not in scheduled]:
            del self._features[rid]
        rows: list[int] = []
        parts: list[torch.Tensor] = []
        for rid, images, start, num_tokens, first_row in chunks:
            end = start + num_tokens
            for index, image in enumerate(images):
                lo, hi = max(start, image.offset), min(end, image.end)
                if lo >= hi:
                    continue
                cached = self._features.setdefault(rid, {})
                if index not in cached:
                    cached[index] = encode(image)
                    self.num_encoded += 1
                parts.append(cached[index][lo - image.offset : hi - image.offset])
                rows.extend(range(first_row + lo - start, first_row + hi - start))
                if hi == image.end:  # its last placeholder is computed now: no chunk needs it again
                    del cached[index]
        if not parts:
            return None
        return rows, torch.cat(parts)
