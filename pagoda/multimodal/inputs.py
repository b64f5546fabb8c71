"""What a request carries for each image, across the engine core's boundary: its preprocessed
tensors (as bytes: msgspec holds no torch tensors), where its placeholder tokens lie in the
prompt, and a digest of its content (the prefix cache's key for the blocks it covers)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import msgspec
import numpy as np

if TYPE_CHECKING:  # the server's front end, which carries these, imports no torch
    import torch


class TensorData(msgspec.Struct, array_like=True):
    """A tensor as bytes, its dtype's name and its shape."""

    data: bytes
    dtype: str
    shape: list[int]

    @classmethod
    def from_tensor(cls, tensor: torch.Tensor) -> TensorData:
        array = tensor.detach().cpu().contiguous().numpy()
        return cls(array.tobytes(), array.dtype.str, list(array.shape))

    def to_tensor(self) -> torch.Tensor:
        import torch

        return torch.from_numpy(np.frombuffer(self.data, dtype=np.dtype(self.dtype)).reshape(self.shape).copy())


class ImageInput(msgspec.Struct, array_like=True):
    """One image of a prompt: its placeholder tokens are prompt[offset : offset + length]."""

    offset: int
    length: int
    content_hash: str  # hex digest of the image's pixels, mode and size
    # The processor's outputs for this image alone (pixel_values, image_grid_thw, ...), by name.
    tensors: dict[str, TensorData]

    @property
    def end(self) -> int:
        return self.offset + self.length

    def torch_tensors(self) -> dict[str, torch.Tensor]:
        return {name: t.to_tensor() for name, t in self.tensors.items()}


def block_extra_keys(images: Sequence[ImageInput], start: int, end: int) -> tuple[str, ...]:
    """The content digests of the images whose placeholders overlap tokens [start, end): a block's
    key must change with the image behind its placeholder tokens, which are the same for any image."""
    return tuple(image.content_hash for image in images if image.offset < end and start < image.end)


def image_tokens(images: Sequence[ImageInput]) -> int:
    """The prompt tokens that stand for images."""
    return sum(image.length for image in images)
