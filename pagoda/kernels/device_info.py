"""What the kernels' launch choices need to know of the GPU."""

from __future__ import annotations

from functools import cache

import torch


@cache
def num_sms(device: torch.device, on_cpu: int = 132) -> int:
    """The streaming multiprocessors of a CUDA device; `on_cpu` under Triton's interpreter (an
    H100's 132 by default, so the interpreter exercises the launch shapes a GPU gets)."""
    if device.type != "cuda":
        return on_cpu
    return torch.cuda.get_device_properties(device).multi_processor_count
