"""What the kernels' launch choices need to know of the GPU."""

from __future__ import annotations

from functools import cache

import torch
import triton


@cache
def num_sms(device: torch.device, on_cpu: int = 132) -> int:
    """The streaming multiprocessors of a CUDA device; `on_cpu` under Triton's interpreter (an
    H100's 132 by default, so the interpreter exercises the launch shapes a GPU gets)."""
    if device.type != "cuda":
        return on_cpu
    return torch.cuda.get_device_properties(device).multi_processor_count


@cache
def has_fp8(device: torch.device) -> bool:
    """Whether `device` is a GPU with fp8 (Ada / Hopper and later: compute capability >= 8.9): its
    tensor cores multiply fp8, and its PTX converts fp8 pairs in one instruction."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


@cache
def is_hopper(device: torch.device) -> bool:
    """Whether `device` is a Hopper GPU (compute capability 9.x: TMA, and shared memory for 128 x 256 tiles)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] == 9


def fills(tiles: int, waves: int, device: torch.device) -> bool:
    """Whether `tiles` programs make at least `waves` a SM (where k_splits gives 1)."""
    return tiles >= waves * num_sms(device, on_cpu=1)


def k_splits(tiles: int, waves: int, most: int, device: torch.device) -> int:
    """Slices of K, a power of two up to `most`, that make an output of `tiles` tiles about `waves`
    programs a SM (one where the tiles alone do)."""
    return min(most, triton.next_power_of_2(triton.cdiv(waves * num_sms(device, on_cpu=1), tiles)))


def k_slices(length: int, splits: int, step: int) -> tuple[int, int]:
    """`length` cut into at most `splits` slices of whole `step`s: (a slice's length, the slices)."""
    per_slice = triton.cdiv(triton.cdiv(length, splits), step) * step
    return per_slice, triton.cdiv(length, per_slice)
