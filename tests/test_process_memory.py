"""What a CPU server's processes hold: release_free_memory hands the heap's freed pages back to the
OS (glibc), so what an engine core's steps freed stops counting in its resident memory once it is
idle; the front end and the engine core do not import Triton (~70 MB each) to run on the CPU."""

from __future__ import annotations

import ctypes
import ctypes.util
import platform
import subprocess
import sys

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


def test_the_server_processes_import_no_triton():
    # What `pagoda serve`'s front end and the engine core process import before any GPU kernel runs.
    code = "import sys, pagoda.entrypoints.openai.server, pagoda.engine.core_proc; print('triton' in sys.modules)"
    imported = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert imported.stdout.split()[-1] == "False"
