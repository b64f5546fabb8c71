"""What a CPU server's processes hold: release_free_memory hands the heap's freed pages back to the
OS (glibc), so what an engine core's steps freed stops counting in its resident memory once it is
idle; the front end and the engine core do not import Triton (~70 MB each) to run on the CPU; the
front end does not load torch at all."""

from __future__ import annotations

import ctypes
import ctypes.util
import platform
import subprocess
import sys
from pathlib import Path

import httpx
import psutil
import pytest

from pagoda.free_memory import release_free_memory
from tests.serving import MODEL, engine_core_pid, serving, tiny_model_args

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


def _maps_torch(pid: int) -> bool:
    """Whether the process has torch's library loaded."""
    return any("libtorch_cpu" in line for line in Path(f"/proc/{pid}/maps").read_text().splitlines())


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="Linux's /proc")
def test_the_servers_front_end_loads_no_torch(tmp_path):
    # The front end tokenizes, routes and detokenizes: torch (~200 MB resident) is the engine
    # core's alone, forked from a fork server that imported it (engine/core_launcher.py).
    with serving(tiny_model_args(tmp_path), tmp_path / "server.log") as (proc, base):
        chat = httpx.post(f"{base}/v1/chat/completions", timeout=120, json={
            "model": MODEL, "max_tokens": 4, "logprobs": True, "top_logprobs": 2,
            "messages": [{"role": "user", "content": "Hello"}],
        })
        assert chat.status_code == 200, chat.text
        assert chat.json()["choices"][0]["logprobs"]["content"]
        assert _maps_torch(engine_core_pid(proc.pid))  # the check sees torch where it is
        assert not _maps_torch(proc.pid)
