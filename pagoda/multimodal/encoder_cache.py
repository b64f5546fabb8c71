"""The runner's side of images: each scheduled prompt chunk's image features, merged into the
token embeddings at its placeholder rows. An image is encoded once, when the first chunk that
covers any of its placeholders runs; its features are kept for the request's later chunks (a
chunked prefill does not re-encode) and dropped once the chunk that covers its last placeholder
has run, or when the request is not scheduled in a step (preempted or gone: a later chunk encodes
it again). The images a step needs encoded go to the model together (one vision-tower call per
shape, models/llava.py and models/qwen2_vl.py)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from pagoda.multimodal.inputs import ImageInput

# Images' encoder outputs, in order: each [its placeholder count, hidden size].
Encoder = Callable[[Sequence[ImageInput]], list[torch.Tensor]]


class EncoderCache:
    def __init__(self) -> None:
        self._features: dict[str, dict[int, torch.Tensor]] = {}  # request id -> image index -> features
        self.num_encoded = 0  # images encoded so far (tests read it: a chunked prefill encodes once)

    def step_features(
        self, chunks: Sequence[tuple[str, Sequence[ImageInput], int, int, int]], encode: Encoder
    ) -> tuple[list[int], torch.Tensor] | None:
        """For chunks (request id, its images, first position, token count, first row in the
        batch): the batch rows of image placeholders and their features, row order kept; None
        when no chunk covers an image. The step's images not yet encoded go to `encode` together."""
        scheduled = {rid for rid, *_ in chunks}
        for rid in [rid for rid in self._features if rid not in scheduled]:
            del self._features[rid]
        # (request id, image index, the image, covered positions lo..hi, first row)
        spans: list[tuple[str, int, ImageInput, int, int, int]] = []
        for rid, images, start, num_tokens, first_row in chunks:
            for index, image in enumerate(images):
                lo, hi = max(start, image.offset), min(start + num_tokens, image.end)
                if lo < hi:
                    spans.append((rid, index, image, lo, hi, first_row + lo - start))
        if not spans:
            return None
        self._encode_missing(spans, encode)
        rows: list[int] = []
        parts: list[torch.Tensor] = []
        for rid, index, image, lo, hi, row in spans:
            cached = self._features[rid]
            parts.append(cached[index][lo - image.offset : hi - image.offset])
            rows.extend(range(row, row + hi - lo))
            if hi == image.end:  # its last placeholder is computed now: no chunk needs it again
                del cached[index]
        return rows, torch.cat(parts)

    def _encode_missing(self, spans: Sequence[tuple[str, int, ImageInput, int, int, int]], encode: Encoder) -> None:
        missing = [(rid, index, image) for rid, index, image, *_ in spans
                   if index not in self._features.get(rid, {})]
        if not missing:
            return
        for (rid, index, _), features in zip(missing, encode([image for *_, image in missing])):
            self._features.setdefault(rid, {})[index] = features
        self.num_encoded += len(missing)
