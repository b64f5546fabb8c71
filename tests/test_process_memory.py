"""What a CPU server's processes hold: release_free_memory hands the heap's freed pages back to the
OS (glibc), so what an engine core's steps freed stops counting in its resident memory once it is
idle; the front end and the engine core do not import Triton (~70 MB each) to run on the CPU; the
front end loads torch only with xgrammar, for a structured-output request, and off its event loop;
its pooling arithmetic needs none."""

from __future__ import annotations

import ctypes
import ctypes.util
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest

from pagoda.free_memory import release_free_memory
from tests.serving import MODEL, engine_core_pid, maps_library, serving, tiny_model_args

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


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="Linux's /proc")
def test_the_servers_front_end_loads_torch_only_for_a_grammar_and_off_its_event_loop(tmp_path):
    # The front end tokenizes, routes and detokenizes: torch (~200 MB resident) is the engine
    # core's alone, forked from a fork server that imported it (engine/core_launcher.py).
    with serving(tiny_model_args(tmp_path), tmp_path / "server.log") as (proc, base):
        chat = httpx.post(f"{base}/v1/chat/completions", timeout=120, json={
            "model": MODEL, "max_tokens": 4, "logprobs": True, "top_logprobs": 2,
            "messages": [{"role": "user", "content": "Hello"}],
        })
        assert chat.status_code == 200, chat.text
        assert chat.json()["choices"][0]["logprobs"]["content"]
        assert maps_library(engine_core_pid(proc.pid), "libtorch_cpu")  # the check sees torch where it is
        assert not maps_library(proc.pid, "libtorch_cpu")
        # A grammar's first check imports xgrammar, which imports torch: seconds, which must
        # not stop the event loop from streaming a running request's tokens meanwhile.
        arrivals: list[float] = []
        stop = threading.Event()
        streaming = threading.Thread(target=_stream_chunk_times, args=(base, arrivals, stop))
        streaming.start()
        while len(arrivals) < 3 and streaming.is_alive():
            time.sleep(0.01)
        sent = time.monotonic()
        constrained = httpx.post(f"{base}/v1/completions", timeout=120, json={
            "model": MODEL, "prompt": "Hello", "max_tokens": 4, "response_format": {"type": "json_object"},
        })
        answered = time.monotonic()
        stop.set()
        streaming.join()
        assert constrained.status_code == 200, constrained.text
        assert maps_library(proc.pid, "libtorch_cpu")  # the request did load torch, meanwhile
        inside = [t for t in arrivals if sent < t < answered]
        longest_gap = max(b - a for a, b in zip([sent, *inside], [*inside, answered]))
        # Importing torch holds the GIL at times (~1.5 s at most here, against 3.4 s of a window of
        # 4.9 when the import ran on the event loop).
        assert longest_gap < (answered - sent) / 2, (longest_gap, answered - sent, len(inside))


def _stream_chunk_times(base: str, arrivals: list[float], stop: threading.Event) -> None:
    """Stream long completions, one after another until stop is set, appending each chunk's
    arrival time."""
    body = {"model": MODEL, "prompt": "Hello", "max_tokens": 900, "ignore_eos": True, "stream": True}
    while not stop.is_set():
        with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=120) as response:
            for line in response.iter_lines():
                if line.startswith("data: {"):
                    arrivals.append(time.monotonic())
                if stop.is_set():
                    return


def test_pooling_arithmetic_needs_no_torch():
    # The front end turns pooled vectors into embeddings, probabilities and scores.
    code = (
        "import sys; from pagoda.pooling import PoolerConfig, PoolingParams, embedding, probabilities; "
        "from pagoda.scoring import cosine_score; "
        "embedding([3.0, 4.0], PoolerConfig('LAST', True), PoolingParams()); probabilities([1.0, 2.0]); "
        "cosine_score([1.0, 0.0], [1.0, 1.0]); print('torch' in sys.modules)"
    )
    imported = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert imported.stdout.split()[-1] == "False"
