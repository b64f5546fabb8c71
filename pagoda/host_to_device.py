"""Host values to a device tensor without waiting for the device.

`torch.tensor(values, device="cuda")` copies from pageable memory, which waits for the copy and
so for every kernel queued before it: with the engine's next step prepared while the GPU still
runs the current one, that wait would undo the overlap. Pinned host memory lets the copy join
the stream's queue instead. Torch's pinned-memory cache keeps each buffer until its copy is done."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


def host_tensor(values: Any, dtype: torch.dtype) -> torch.Tensor:
    """`values`, a (nested) list or a numpy array, as a CPU tensor of `dtype`."""
    if isinstance(values, np.ndarray):
        return torch.from_numpy(values).to(dtype)
    return torch.tensor(values, dtype=dtype)


def pinned(values: Any, dtype: torch.dtype) -> torch.Tensor:
    """A pinned host tensor: a CUDA copy from it (non_blocking) does not wait for the device."""
    return host_tensor(values, dtype).pin_memory()


def to_device(values: Any, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """torch.tensor(values, dtype=dtype, device=device) that does not wait for `device`."""
    if device.type != "cuda":
        return host_tensor(values, dtype).to(device)
    return pinned(values, dtype).to(device, non_blocking=True)
