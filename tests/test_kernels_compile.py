"""Every Triton kernel compiles for Hopper (sm_90) on this machine, GPU or not
(scripts/compile_kernels.py, in a process of its own: this one may run Triton's interpreter,
which accepts code that the compiler refuses)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
SCRIPT = Path(__file__).parent.parent / "scripts" / "compile_kernels.py"


def test_every_kernel_compiles_for_hopper():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, str(SCRIPT)], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert lines and all(line.endswith("bytes of sm_90 code") for line in lines), done.stdout
    assert any(line.startswith("paged attention, split decode:") for line in lines)
    assert "TRITON_DEFAULT_FP_FUSION" not in done.stderr  # Triton 3.9's warning: pagoda.kernels sets it


@pytest.mark.parametrize("stated, fused", [(None, True), ("0", False)])
def test_kernels_fuse_multiply_adds_unless_the_user_says_not(stated, fused):
    """Triton 3.10 stops fusing multiply-adds by default; importing the kernels keeps it fusing,
    and a user's TRITON_DEFAULT_FP_FUSION still decides."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "TRITON_DEFAULT_FP_FUSION")}
    if stated is not None:
        env["TRITON_DEFAULT_FP_FUSION"] = stated
    # Triton's warning that the default is unset fails the check; other warnings of an import do not.
    check = ("import warnings; warnings.filterwarnings('error', message='.*TRITON_DEFAULT_FP_FUSION'); "
             "import pagoda.kernels; from triton import knobs; print(knobs.language.fp_fusion_enabled(None))")
    done = subprocess.run([sys.executable, "-c", check], env=env, capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).parent.parent)
    if "has no attribute 'fp_fusion_enabled'" in done.stderr:
        pytest.skip("this Triton decides fusion per kernel option only")
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == str(fused)


def ptx_counts(kernel: str, *options: str) -> dict[str, int]:
    """scripts/compile_kernels.py's counts of instruction kinds in a kernel's sm_90 PTX."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, str(SCRIPT), "--ptx", kernel, *options], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return {kind: int(n) for kind, n in (line.rsplit(": ", 1) for line in done.stdout.splitlines())}


def test_fp8_decode_attention_reads_the_cache_in_vectors():
    """The PTX of the fp8-cache decode attention, specialised as a GPU launch is: its tiles come
    from global memory in 16-byte async copies, never a byte at a time, and meet the tensor cores."""
    counts = ptx_counts("paged attention, fp8 KV decode")
    assert counts["global loads, 8-bit"] == 0, counts
    assert counts["async copies to shared"] > 0 and counts["mma.sync"] > 0, counts
    assert counts["fp8 -> fp16 pair conversions"] > 0, counts


@pytest.mark.parametrize("kernel", ["paged attention, fp8 KV decode", "paged attention, fp8 KV split decode"])
def test_fp8_decode_attention_reads_values_from_shared_memory_in_vectors(kernel):
    """Decodes (one warp; split, two) upcast the fp8 V tile before Triton stores it in shared
    memory, so p @ v reads it with ldmatrix, never a byte at a time (Triton moves a plain cast past
    the store)."""
    counts = ptx_counts(kernel)
    assert counts["shared loads, 8-bit"] == 0 and counts["ldmatrix"] > 0, counts
    assert counts["fp8 -> fp16 pair conversions"] > 0 and counts["mma.sync"] > 0, counts


def test_w4a16_gemm_tiles_fit_in_shared_memory_for_every_activation_dtype():
    """The W4A16 GEMM at each tile shape it picks (decode, mid-size and large M), groups under its
    K tile (a scale and a zero point per input row), with the stages it launches: float32 decode
    tiles in 4 stages needed 266 KB, more than an H100 or H200 has (227 KB); the GPU raised
    OutOfResources at the first call."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    check = f"""
import sys, torch
sys.path.insert(0, {str(SCRIPT.parent)!r})
from compile_kernels import KERNELS, compile_for_hopper
from pagoda.kernels.w4a16_gemm import _stages, choose_config
kernel, signature, constexprs = KERNELS["W4A16 GEMM, decode tiles"]
for rows in (1, 64, 512):
    config = choose_config(rows, 4096, 4096, torch.device("cpu"))
    tiles = dict(constexprs, BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k)
    for dtype, name in ((torch.float32, "fp32"), (torch.bfloat16, "bf16"), (torch.float16, "fp16")):
        typed = {{arg: "*" + name if arg in ("x_ptr", "scales_ptr", "zeros_ptr") else kind
                 for arg, kind in signature.items()}}
        compiled = compile_for_hopper(kernel, typed, tiles, num_warps=config.num_warps,
                                      num_stages=_stages(config, dtype, one_group=False))
        print(f"{{name}}@{{rows}}", compiled.metadata.shared)
"""
    done = subprocess.run([sys.executable, "-c", check], env=env, capture_output=True, text=True, timeout=600,
                          cwd=SCRIPT.parent.parent)
    assert done.returncode == 0, done.stderr[-3000:]
    shared = {name: int(size) for name, size in (line.split() for line in done.stdout.splitlines())}
    assert set(shared) == {f"{name}@{rows}" for name in ("fp32", "bf16", "fp16") for rows in (1, 64, 512)}
    assert max(shared.values()) <= 227 * 1024, shared


@pytest.mark.parametrize("kernel", [
    "add + RMSNorm", "add + RMSNorm, static fp8 out", "rotary", "combine splits", "SiLU-and-mul", "KV write, bf16",
])
def test_small_decode_kernels_load_everything_before_they_wait(kernel):
    """Each of these runs once a layer in a batch-1 decode step, which waits for it: every global load is
    issued before the first store, reduction or barrier, so that they share one trip to memory."""
    counts = ptx_counts(kernel)
    assert counts["global loads after the first wait"] == 0, counts


@pytest.mark.parametrize("kernel", ["paged attention, decode", "paged attention, split decode"])
def test_attention_loads_its_request_before_its_first_branch(kernel):
    """The query offsets and the sequence length (three loads) make one trip to memory: none of them
    waits for the early-exit branch on the query length."""
    counts = ptx_counts(kernel)
    assert counts["global loads before the first branch"] == 3, counts


def test_w4a16_gemv_reads_its_weights_in_vectors():
    """At a model's launch (N and the packed rows multiples of 16, as Triton's launcher then
    specialises them) each thread reads its packed words 16 bytes at a time: 4 columns of a word."""
    counts = ptx_counts("W4A16 GEMV", "--num-warps", "4")
    assert counts["global loads, vector"] >= 2, counts
