"""CPU kernels in C (cpu_native.c) where torch's ops cost more in dispatch than in arithmetic: a
step of decodes' attention, the step's keys and values written into the paged float32 pool and each
row's query heads attended over its positions in place, read through its block table. In torch ops
that is a write, a gather and scaled_dot_product_attention a layer (~25-45 us at one stream of the
default model, of which the arithmetic is a few; docs/benchmarks.md, "CPU, session 26").

The library is built when the CPU attention backend is made, with the system's C compiler (-O3
-march=native, OpenMP: the libgomp torch has loaded serves it) into $PAGODA_CACHE_DIR/cpu_native,
keyed by the source, the compiler, the flags and the CPU. Without a compiler `load` returns None
and torch's ops run."""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from functools import cache
from pathlib import Path

import torch

from pagoda.loader.cache_dir import pagoda_cache_dir

logger = logging.getLogger("pagoda")

_SOURCE = Path(__file__).with_name("cpu_native.c")
_FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c11"]
_P, _I, _I64 = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64


@cache
def load() -> ctypes.CDLL | None:
    """The built library, or None (logged once) without a C compiler or when the build or the load fails."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        logger.info("no C compiler: the CPU's decode attention runs in torch ops")
        return None
    source = _SOURCE.read_text()
    key = hashlib.sha256("\0".join([source, compiler, *_FLAGS, _cpu_model()]).encode()).hexdigest()[:16]
    path = pagoda_cache_dir() / "cpu_native" / f"cpu_native_{key}.so"
    try:
        if not path.exists():
            _build(compiler, path)
        library = ctypes.CDLL(str(path))
    except OSError as error:  # a compiler that fails or does not run, an unwritable cache, a library that does not load
        logger.warning("the CPU kernels are not built (%s): torch ops run instead", error)
        return None
    library.decode_attention.restype = _I
    library.decode_attention.argtypes = [_P, _P, _P, _P, _I64, _P, _P, _I64, _P, _I, _I, _I, _I, _I, ctypes.c_float, _P]
    return library


def _build(compiler: str, path: Path) -> None:
    """Compile into path; OSError with the compiler's last line of errors if it fails."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        built = Path(tmp) / path.name
        result = subprocess.run([compiler, *_FLAGS, str(_SOURCE), "-o", str(built), "-lm"], capture_output=True, text=True)
        if result.returncode != 0:
            last = (result.stderr.strip().splitlines() or [f"exit status {result.returncode}"])[-1]
            raise OSError(f"{compiler}: {last}")
        os.replace(built, path)  # atomic: a process beside this one sees the whole file or none


def _cpu_model() -> str:
    """What -march=native compiles for: the CPU's model and flags."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor()
    return "\n".join(sorted({line for line in lines if line.startswith(("model name", "flags"))}))


def decode_attention(
    library: ctypes.CDLL, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
) -> torch.Tensor:
    """A step of decodes only: k and v [B, Hkv, D] written into kv_cache [2, blocks, block_size, Hkv, D]
    at slot_mapping [B] (int64), then q [B, Hq, D] attended over each row's seq_lens [B] (int32)
    positions through block_tables [B, n] (int32) -> [B, Hq, D]. float32 throughout; q, k, v contiguous."""
    rows, num_heads, head_dim = q.shape
    out = torch.empty_like(q)
    failed = library.decode_attention(
        q.data_ptr(), k.data_ptr(), v.data_ptr(), kv_cache.data_ptr(), kv_cache[0].numel(),
        slot_mapping.data_ptr(), block_tables.data_ptr(), block_tables.stride(0), seq_lens.data_ptr(),
        rows, num_heads, kv_cache.shape[3], head_dim, kv_cache.shape[2], scale, out.data_ptr(),
    )
    if failed:
        raise MemoryError("CPU decode attention: no memory for a row's scores")
    return out

