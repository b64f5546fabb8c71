"""Handing freed heap memory back to the operating system. glibc's allocator keeps what a burst of
steps freed (each step's activations and attention temporaries, up to ~130 MB for 16 streams of
the default model on the CPU) for reuse, so a process's resident memory stays at its peak; an
idle process can give it back (malloc_trim). Elsewhere (musl, macOS) this does nothing."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from collections.abc import Callable


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    return getattr(libc, "malloc_trim", None)


def release_free_memory() -> None:
    """Return the heap's free pages to the OS (a few milliseconds: call it when idle)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
