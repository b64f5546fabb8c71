"""Qwen2-VL's multimodal rotary positions (M-RoPE): each token has a temporal, a height and a
width position. A text token's three are equal: its index, shifted by what the images before it
changed; an image's placeholders take their row and column in the image's merged patch grid,
from the position the image starts at, and the text after an image continues from that start
plus the grid's larger side. Computed from the request's ImageInputs (their image_grid_thw) for
any span of its tokens; past the prompt, a token's position is its index plus `mrope_delta`."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from pagoda.multimodal.inputs import ImageInput


def _merged_grid(image: ImageInput, merge: int) -> tuple[int, int, int]:
    t, h, w = (int(x) for x in image.tensors["image_grid_thw"].to_tensor().reshape(-1)[:3])
    return t, h // merge, w // merge


def _shift(image: ImageInput, merge: int) -> int:
    """How much an image moves the positions of the tokens after it."""
    _, h, w = _merged_grid(image, merge)
    return max(h, w) - image.length


def mrope_delta(images: Sequence[ImageInput], merge: int) -> int:
    """Position minus index for the tokens after the last image (the generated ones included)."""
    return sum(_shift(image, merge) for image in images)


def mrope_positions(images: Sequence[ImageInput], start: int, end: int, merge: int) -> np.ndarray:
    """[3, end - start] int64 positions of tokens [start, end) of a prompt with these images."""
    index = np.arange(start, end, dtype=np.int64)
    out = np.broadcast_to(index, (3, end - start)).copy()
    shift = 0  # of the images before this one
    for image in images:  # in prompt order
        lo, hi = max(start, image.offset), min(end, image.end)
        if lo < hi:
            _, h, w = _merged_grid(image, merge)
            k = np.arange(lo - image.offset, hi - image.offset)  # placeholder index within the image
            out[:, lo - start : hi - start] = image.offset + shift + np.stack([k // (h * w), (k // w) % h, k % w])
        # Every token after the image moves (a later image's placeholders are overwritten above).
        after = max(start, image.end)
        if after < end:
            out[:, after - start :] += _shift(image, merge)
        shift += _shift(image, merge)
    return out
