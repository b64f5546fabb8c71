"""CPU kernels in C (cpu_native.c) where torch's own cost more than the arithmetic needs:
- a step of decodes' attention, the step's keys and values written into the paged float32 pool and
  each row's query heads attended over its positions in place, read through its block table. In
  torch ops that is a write, a gather and scaled_dot_product_attention a layer (~25-45 us at one
  stream of the default model, of which the arithmetic is a few; docs/benchmarks.md, "CPU, session 26");
- the 4-bit weight-only matmul (`torch.ops.pagoda.int4_matmul`, for pagoda/quantization/int4pack.py)
  where the CPU has AVX512-VNNI or AVX2: activations in steps of each 32 inputs' largest, summed
  exactly in integers. With VNNI in int16 (vpdpwssd), 1.6-2.2x torch's int4 kernel over a decode
  step's layers (docs/benchmarks.md, "CPU, session 27"). With AVX2 in int8 by default, as llama.cpp
  takes them (vpmaddubsw; ~1.6x int16's vpmaddwd at 16 rows, "CPU, session 30"), or in int16 with
  PAGODA_CPU_INT4_ACTIVATIONS=int16 (2.4x torch's kernel, "CPU, session 29"): int8 steps move the
  default model's logits by ~0.07 nats (median) and its perplexity by ~1 %, so greedy tokens may
  part from the float32 path's where its two best are that close;
- the Q8_0 rows' matmul of the LM head's screen (pagoda/layers/lm_head_screen.py), the same way;
- the decoder layers' RMSNorm (with the residual add before it), rotary embedding and SiLU-and-mul
  in float32, where torch's several small ops a call cost more than the arithmetic at decode
  batches; and a Llama-style model's decoder layers for a decode step in one call
  (pagoda/models/cpu_decode_layer.py).

The library is built when first asked for, with the system's C compiler (-O3 -march=native, OpenMP:
the libgomp torch has loaded serves it; -fno-trapping-math, without which GCC vectorizes no loop
with a clamp, as the softmax's and SiLU's exponentials have, on AVX2) into
$PAGODA_CACHE_DIR/cpu_native, keyed by the source, the compiler, the flags and the CPU. Without a
compiler `load` returns None and torch's ops run."""

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
_FLAGS = ["-O3", "-march=native", "-fno-trapping-math", "-fopenmp", "-shared", "-fPIC", "-std=c11"]
_P, _I, _I64 = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64
_DECODE_ATTENTION = {
    torch.float32: "decode_attention", torch.bfloat16: "decode_attention_bf16", torch.float16: "decode_attention_f16",
}


class DecoderLayer(ctypes.Structure):
    """cpu_native.c's decoder_layer: a Llama-style layer as decode_layers reads it."""

    _fields_ = [
        *((name, _P) for name in ("input_norm", "post_norm", "w_qkv", "w_o", "w_gate_up", "w_down", "qkv_bias",
                                   "o_bias", "gate_up_bias", "down_bias", "q_norm", "k_norm", "cos_sin", "attend",
                                   "pool")),
        ("half", _I64),
        *((name, _I) for name in ("hidden", "intermediate", "rotary_dim", "num_heads", "num_kv_heads", "head_dim",
                                   "block_size")),
        *((name, ctypes.c_float) for name in ("eps", "qk_eps", "scale")),
    ]


@cache
def load() -> ctypes.CDLL | None:
    """The built library, or None (logged once) without a C compiler or when the build or the load fails."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        logger.info("no C compiler: the CPU's decode attention and int4 matmuls run in torch ops")
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
    for name in _DECODE_ATTENTION.values():  # float16's where the compiler has _Float16
        function = getattr(library, name, None)
        if function is not None:
            function.restype = _I
            function.argtypes = [
                _P, _I64, _P, _P, _I64, _P, _I64, _P, _P, _I64, _P, _I, _I, _I, _I, _I, ctypes.c_float, _P,
            ]
    library.int4_matmul.restype = _I
    library.int4_matmul.argtypes = [_P, _I, _I, _P, _I64, _P]
    library.set_int4_activation_levels.restype = None
    library.set_int4_activation_levels.argtypes = [_I]
    library.set_int4_activation_levels(_activation_levels(os.environ.get("PAGODA_CPU_INT4_ACTIVATIONS", "int8")))
    library.q8_matmul.restype = _I
    library.q8_matmul.argtypes = [_P, _I, _I, _P, _P, _I64, _P]
    library.q8_exact_near_the_max.restype = None
    library.q8_exact_near_the_max.argtypes = [_P, _I, _I, _P, _P, _I64, _P, _P]
    library.rms_norm.restype = None
    library.rms_norm.argtypes = [_P, _P, _P, _I, _I, ctypes.c_float, _P]
    library.rotary.restype = None
    library.rotary.argtypes = [_P, _I, _P, _I64, _I, _P, _I64, _I, _I, _P, _I]
    library.silu_and_mul.restype = None
    library.silu_and_mul.argtypes = [_P, _I, _I, _P]
    library.decode_layers.restype = _I
    library.decode_layers.argtypes = [
        ctypes.POINTER(DecoderLayer), _I, _P, _P, _I, _I, _P, _P, _P, _I64, _P, _P,
    ]
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


def decode_attends(library: ctypes.CDLL, kv_cache_dtype: torch.dtype) -> bool:
    """Whether `decode_attention` reads a pool of this dtype."""
    name = _DECODE_ATTENTION.get(kv_cache_dtype)
    return name is not None and hasattr(library, name)


@cache
def decode_attention_address(library: ctypes.CDLL, kv_cache_dtype: torch.dtype) -> int:
    """The address of the decode attention for pools of this dtype (decode_attends must hold), for
    C code that calls it (the whole decode layer)."""
    return ctypes.cast(getattr(library, _DECODE_ATTENTION[kv_cache_dtype]), ctypes.c_void_p).value


def decode_attention(
    library: ctypes.CDLL, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
) -> torch.Tensor:
    """A step of decodes only: k and v [B, Hkv, D] written into kv_cache [2, blocks, block_size, Hkv, D]
    at slot_mapping [B] (int64), then q [B, Hq, D] attended over each row's seq_lens [B] (int32)
    positions through block_tables [B, n] (int32) -> [B, Hq, D] (contiguous). q, k, v float32, each
    row's heads packed (views of the qkv projection's output are: others are copied; k and v rows
    alike apart); the pool float32, bfloat16 or float16 (decode_attends), its values converted as
    torch converts them."""
    q, k, v = (t if t.stride(2) == 1 and t.stride(1) == t.shape[2] else t.contiguous() for t in (q, k, v))
    if k.stride(0) != v.stride(0):
        k, v = k.contiguous(), v.contiguous()
    rows, num_heads, head_dim = q.shape
    out = torch.empty(q.shape, dtype=q.dtype)
    failed = getattr(library, _DECODE_ATTENTION[kv_cache.dtype])(
        q.data_ptr(), q.stride(0), k.data_ptr(), v.data_ptr(), k.stride(0), kv_cache.data_ptr(), kv_cache[0].numel(),
        slot_mapping.data_ptr(), block_tables.data_ptr(), block_tables.stride(0), seq_lens.data_ptr(),
        rows, num_heads, kv_cache.shape[3], head_dim, kv_cache.shape[2], scale, out.data_ptr(),
    )
    if failed:
        raise MemoryError("CPU decode attention: no memory for a row's scores")
    return out


# The decoder layers' norms, rotary embedding and SiLU-and-mul --------------------------------------


def elementwise_serves(*tensors: torch.Tensor) -> bool:
    """Whether `rms_norm`, `rotary_inplace` and `silu_and_mul` take these tensors: float32 on the
    CPU, outside a compiled graph (where inductor fuses torch's ops itself), the library built.
    Eagerly, torch's rms_norm and the rotary's ~10 ops cost ~10 and ~19 us a layer at one row, the
    C ~1-2."""
    for tensor in tensors:  # (a loop: this runs ~120 times a decode step)
        if tensor.dtype != torch.float32 or not tensor.is_cpu:
            return False
    return not torch.compiler.is_compiling() and load() is not None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None) -> torch.Tensor:
    """RMSNorm of x [.., hidden] (float32) by weight; with `residual` (contiguous), x + residual is
    written into it and normed, as the CUDA kernel (pagoda/kernels/elementwise.py) does."""
    x = x.contiguous()
    out = torch.empty_like(x)
    hidden = x.shape[-1]
    load().rms_norm(x.data_ptr(), 0 if residual is None else residual.data_ptr(), weight.data_ptr(),
                    x.numel() // hidden, hidden, eps, out.data_ptr())
    return out


def rotary_inplace(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin: torch.Tensor) -> None:
    """q [T, Hq, D] and k [T, Hk, D] (float32, heads D apart: views of the qkv projection) rotated in
    place by rows `positions` [T] (int64) of cos_sin [*, R] (cosines, then sines), as
    pagoda/layers/rotary.py's torch path rotates them (rounded the same)."""
    tokens, q_heads, head_dim = q.shape
    load().rotary(positions.data_ptr(), tokens, q.data_ptr(), q.stride(0), q_heads, k.data_ptr(), k.stride(0),
                  k.shape[1], head_dim, cos_sin.data_ptr(), cos_sin.shape[1])


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up of x [.., 2n] = [gate | up] (float32) -> [.., n], as torch rounds it but for
    e^x (a polynomial within float32's rounding, where libm's would not vectorize)."""
    x = x.contiguous()
    n = x.shape[-1] // 2
    out = x.new_empty(*x.shape[:-1], n)
    load().silu_and_mul(x.data_ptr(), x.numel() // (2 * n), n, out.data_ptr())
    return out


# The 4-bit weight-only matmul ------------------------------------------------------------------

INT4_OUTPUTS, INT4_INPUTS = 16, 32  # a weight block's outputs and inputs (cpu_native.c's layout)


def int_matmuls_available() -> bool:
    """Whether the C int4 and Q8_0 matmuls run here: built, on a CPU with AVX512-VNNI or AVX2 (with FMA
    and F16C)."""
    library = load()
    return library is not None and bool(library.int_matmuls_supported())


_ACTIVATION_LEVELS = {"int8": 127, "int16": 32767}


def _activation_levels(name: str) -> int:
    if name not in _ACTIVATION_LEVELS:
        raise ValueError(f"PAGODA_CPU_INT4_ACTIVATIONS={name!r}: the int4 matmul's activations are int8 or int16")
    return _ACTIVATION_LEVELS[name]


def set_int4_activations(name: str) -> None:
    """This process's int4 matmul activations from now on: "int8" (where the CPU has AVX2 without
    AVX512-VNNI, the default) or "int16" (the only kind with VNNI), as PAGODA_CPU_INT4_ACTIVATIONS
    sets them at the library's load."""
    levels = _activation_levels(name)
    library = load()
    if library is not None:
        library.set_int4_activation_levels(levels)


def int4_activation_levels() -> int:
    """The int4 matmul's activations: each block of 32 inputs in steps of max|x| / this (127: int8;
    32767: int16)."""
    return load().int4_activation_levels()


def int4_pack(q: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """W = d * q + m, from q [N, K] (integers 0..15) and d, m [N, K / 32] (rounded to float16), as
    the uint8 blocks the C matmul reads [N / 16, K / 32, 320] (N a multiple of 16, K of 32)."""
    n, k = q.shape
    blocks, groups = n // INT4_OUTPUTS, k // INT4_INPUTS
    # [block, group, step of 2 inputs, output, input], then the steps paired into the nibbles of a byte
    steps = q.to(torch.uint8).reshape(blocks, INT4_OUTPUTS, groups, INT4_INPUTS // 2, 2).permute(0, 2, 3, 1, 4)
    steps = steps.reshape(blocks, groups, INT4_INPUTS // 4, 2, 2 * INT4_OUTPUTS)
    nibbles = (steps[:, :, :, 0] | (steps[:, :, :, 1] << 4)).reshape(blocks, groups, -1)

    def per_block(values: torch.Tensor) -> torch.Tensor:
        values = values.to(torch.float16).reshape(blocks, INT4_OUTPUTS, groups).permute(0, 2, 1)
        return values.contiguous().view(torch.uint8)

    return torch.cat([nibbles, per_block(d), per_block(m)], dim=2).contiguous()


def q8_matmul(x: torch.Tensor, blocks: torch.Tensor, block_scales: torch.Tensor, n: int) -> torch.Tensor:
    """x [M, K] float32 (contiguous) @ W^T -> [M, n] float32 for W held as pagoda/layers/q8_rows.py's
    Q8Rows holds it (its `blocks` and `block_scales`, n its rows), x in int16 steps of each row's
    max|x| / 32767 (cpu_native.c says how close). The LM head's screen
    (pagoda/layers/lm_head_screen.py); not an op: it runs outside the compiled forward."""
    out = torch.empty(x.shape[0], n, dtype=torch.float32)
    if load().q8_matmul(x.data_ptr(), x.shape[0], x.shape[1], blocks.data_ptr(), block_scales.data_ptr(), n,
                        out.data_ptr()):
        raise MemoryError("CPU Q8_0 matmul: no memory for the quantized activations")
    return out


def q8_exact_near_the_max(
    x: torch.Tensor, blocks: torch.Tensor, block_scales: torch.Tensor, bound: torch.Tensor, logits: torch.Tensor
) -> None:
    """logits [M, n] of x [M, K] (float32, contiguous) for W held as q8_matmul reads it, each within
    bound [M] of x @ W^T: those within twice the bound of their row's largest recomputed, in place,
    from W's float32 values (the LM head's screen)."""
    load().q8_exact_near_the_max(x.data_ptr(), x.shape[0], x.shape[1], blocks.data_ptr(), block_scales.data_ptr(),
                                 logits.shape[1], bound.contiguous().data_ptr(), logits.data_ptr())


_library = torch.library.Library("pagoda", "FRAGMENT")
_library.define("int4_matmul(Tensor x, Tensor w, int n) -> Tensor")


def int4_matmul(x: torch.Tensor, w: torch.Tensor, n: int) -> torch.Tensor:
    """x [M, K] float32 @ W^T -> [M, n] float32, W packed by int4_pack. Called as it is eagerly;
    a compiled graph calls it through `int4_matmul_op` (the dispatcher's ~1.5 us a call)."""
    x = x.contiguous()
    out = torch.empty(x.shape[0], n, dtype=torch.float32)
    if load().int4_matmul(x.data_ptr(), x.shape[0], x.shape[1], w.data_ptr(), n, out.data_ptr()):
        raise MemoryError("CPU int4 matmul: no memory for the quantized activations")
    return out


_library.impl("int4_matmul", int4_matmul, "CPU")


@torch.library.register_fake("pagoda::int4_matmul")
def _(x, w, n) -> torch.Tensor:
    return x.new_empty(x.shape[0], n)


int4_matmul_op = torch.ops.pagoda.int4_matmul.default
