"""What a CPU server's processes hold: release_free_memory hands the heap's freed pages back to the
OS (glibc), so what an engine core's steps freed stops counting in its resident memory once it is
idle; the front end and the engine core do not import Triton (~70 MB each) to run on the CPU; the
engine core shares the pages of the front end's imports."""

from __future__ import annotations

import ctypes
import ctypes.util
import platform
import re
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from pagoda.free_memory import release_free_memory
from tests.serving import engine_core_pid, serving, tiny_model_args

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


def _shared_dirty_mb(pid: int) -> int:
    """Written pages this process shares with another (copy-on-write since a fork), in MB."""
    rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
    return int(re.search(r"^Shared_Dirty:\s+(\d+) kB", rollup, re.MULTILINE).group(1)) >> 10


@pytest.mark.skipif(not Path("/proc/self/smaps_rollup").exists(), reason="Linux's /proc")
def test_the_engine_core_shares_the_front_ends_imports(tmp_path):
    # The fork server is a fork of the front end once its imports are done: the engine core's
    # copy of torch and the modules stays the front end's pages until either writes them. A
    # fork server started from a fresh interpreter shares none (measured: 0 MB; ~217 MB here).
    with serving(tiny_model_args(tmp_path), tmp_path / "server.log") as (proc, _):
        core = engine_core_pid(proc.pid)
        assert _shared_dirty_mb(core) > 100, Path(f"/proc/{core}/smaps_rollup").read_text()
        assert _shared_dirty_mb(proc.pid) > 100
