"""release_free_memory hands the heap's freed pages back to the OS (glibc): what an engine core's
steps freed stops counting in its resident memory once it is idle."""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

import psutil
import pytest

from pagoda.free_memory import release_free_memory

CHUNK = 64 << 10  # under glibc's mmap threshold: served from the heap, kept there when freed


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's malloc_trim")
def test_freed_heap_memory_leaves_the_resident_set():
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    process = psutil.Process()
    chunks = [libc.malloc(CHUNK) for _ in range(3200)]  # 200 MB, touched
    for chunk in chunks:
        ctypes.memset(chunk, 1, CHUNK)
    for chunk in chunks[:-1]:  # the last keeps the heap's top in use: free() alone cannot shrink it
        libc.free(chunk)
    held = process.memory_info().rss
    release_free_memory()
    assert held - process.memory_info().rss > 150 << 20
    libc.free(chunks[-1])
