"""Compile every Triton kernel of Pagoda for Hopper (sm_90) without a GPU: Triton's bundled ptxas
needs none. The interpreter (what CPU machines run the kernels under) accepts code the compiler
refuses; this catches it before a GPU run does. Arguments are specialised as Triton's launcher
specialises them on a GPU: pointers 16-byte aligned, strides multiples of 16 (without that,
loads the GPU's code makes 16 bytes wide compile a byte at a time), and the integers typed
"i32:16" too, which a model's launches give as multiples of 16 (a layer's N, say).

    python3 scripts/compile_kernels.py        # must run without TRITON_INTERPRET=1
    python3 scripts/compile_kernels.py --ptx "paged attention, fp8 KV decode" [--num-warps 2 --num-stages 3]
        # how many of each kind of load, conversion and MMA one kernel's PTX holds (launched as the
        # engine launches it unless told)
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections import Counter

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from pagoda.attention import triton_backend  # noqa: E402
from pagoda.kernels import elementwise, fp8_gemm, lora, sampling, w4a16_gemm, w4a16_gemv  # noqa: E402

HOPPER = GPUTarget("cuda", 90, 32)
_ATTENTION = {
    "q_ptr": "*bf16", "k_cache_ptr": "*bf16", "v_cache_ptr": "*bf16", "out_ptr": "*bf16", "partial_ptr": "*fp32",
    "partial_max_sum_ptr": "*fp32", "block_tables_ptr": "*i32", "query_start_loc_ptr": "*i32", "seq_lens_ptr": "*i32",
    "k_scale_ptr": "*fp32", "v_scale_ptr": "*fp32", "scale": "fp32", "window": "i32", "soft_cap": "fp32", "stride_qt": "i32", "stride_qh": "i32", "stride_cb": "i32", "stride_cs": "i32",
    "stride_ch": "i32", "stride_ot": "i32", "stride_oh": "i32", "stride_bt": "i32",
}
_ATTENTION_SHAPE = dict(GROUP=4, BLOCK_SIZE=16, HEAD_DIM=128, BLOCK_D=128, HAS_SOFT_CAP=False)
# The same with an fp8 cache (--kv-cache-dtype fp8).
_FP8_ATTENTION = dict(_ATTENTION, k_cache_ptr="*fp8e4nv", v_cache_ptr="*fp8e4nv")
_KV_WRITE = {"k_ptr": "*bf16", "v_ptr": "*bf16", "k_cache_ptr": "*bf16", "v_cache_ptr": "*bf16",
             "slot_mapping_ptr": "*i64", "k_scale_ptr": "*fp32", "v_scale_ptr": "*fp32", "stride_kt": "i32",
             "stride_kh": "i32", "stride_vt": "i32", "stride_vh": "i32"}
_RMS_NORM = {"x_ptr": "*bf16", "residual_ptr": "*bf16", "weight_ptr": "*bf16", "out_ptr": "*bf16", "scale_ptr": "*fp32",
             "stride_x": "i32", "stride_r": "i32", "stride_o": "i32", "n_cols": "i32", "eps": "fp32", "fp8_max": "fp32"}
_SILU = {"x_ptr": "*bf16", "out_ptr": "*bf16", "scale_ptr": "*fp32", "stride_x": "i32", "stride_o": "i32",
         "n_cols": "i32", "fp8_max": "fp32"}
KERNELS = {
    "KV write, bf16": (triton_backend._write_kv_kernel, _KV_WRITE,
                       dict(HEAD_DIM=128, ROW=1024, BLOCK=1024, FP8_MAX=0.0, KV_FP8=False)),
    "fp8 KV write, e4m3": (triton_backend._write_kv_kernel, dict(_KV_WRITE, k_cache_ptr="*fp8e4nv", v_cache_ptr="*fp8e4nv"),
                           dict(HEAD_DIM=128, ROW=1024, BLOCK=1024, FP8_MAX=448.0, KV_FP8=True)),
    "fp8 KV write, e5m2": (triton_backend._write_kv_kernel,
                           dict(_KV_WRITE, k_cache_ptr="*fp8e5", v_cache_ptr="*fp8e5"),
                           dict(HEAD_DIM=128, ROW=1024, BLOCK=1024, FP8_MAX=57344.0, KV_FP8=True)),
    "combine splits": (triton_backend._combine_splits_kernel,
                       {"partial_ptr": "*fp32", "partial_max_sum_ptr": "*fp32", "out_ptr": "*bf16",
                        "query_start_loc_ptr": "*i32", "stride_ot": "i32", "stride_oh": "i32"},
                       dict(NUM_SPLITS=5, SPLITS_POW2=8, HEAD_DIM=128, BLOCK_D=128)),
    "greedy sampling, per split": (sampling._greedy_split_kernel,
                                   {"logits_ptr": "*bf16", "max_ptr": "*fp32", "arg_ptr": "*i32",
                                    "stride_row": "i32", "vocab": "i32", "chunk": "i32", "num_splits": "i32"},
                                   dict(BLOCK=2048)),
    "greedy sampling, combine": (sampling._greedy_combine_kernel,
                                 {"max_ptr": "*fp32", "arg_ptr": "*i32", "tokens_ptr": "*i64",
                                  "vocab": "i32", "num_splits": "i32"},
                                 dict(MAX_SPLITS=64)),
    "fp8 GEMM": (fp8_gemm._fp8_gemm_kernel,
                 {"a_ptr": "*fp8e4nv", "b_ptr": "*fp8e4nv", "a_scale_ptr": "*fp32", "b_scale_ptr": "*fp32",
                  "out_ptr": "*bf16", "M": "i32", "N": "i32", "K": "i32", "stride_am": "i32", "stride_bn": "i32",
                  "stride_om": "i32"}, dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=128, EVEN_K=True)),
    "exponential noise": (sampling._exponential_kernel,
                          {"seeds_ptr": "*i64", "noise_ptr": "*fp32", "stride_row": "i32", "vocab": "i32"},
                          dict(BLOCK=4096)),
    "add + RMSNorm": (elementwise._rms_norm_kernel, _RMS_NORM,
                      dict(HAS_RESIDUAL=True, CAST_BEFORE_SCALE=True, BLOCK=4096, FP8_OUT=False, STATIC=False)),
    "add + RMSNorm, fp8 out": (elementwise._rms_norm_kernel, dict(_RMS_NORM, out_ptr="*fp8e4nv"),
                               dict(HAS_RESIDUAL=True, CAST_BEFORE_SCALE=True, BLOCK=4096, FP8_OUT=True, STATIC=False)),
    # A checkpoint's static activation scale: one value for every row, read where the row is.
    "add + RMSNorm, static fp8 out": (elementwise._rms_norm_kernel, dict(_RMS_NORM, out_ptr="*fp8e4nv"),
                                      dict(HAS_RESIDUAL=True, CAST_BEFORE_SCALE=True, BLOCK=4096, FP8_OUT=True,
                                           STATIC=True)),
    "rotary": (elementwise._rotary_kernel,
               {"q_ptr": "*bf16", "k_ptr": "*bf16", "cos_sin_ptr": "*fp32", "positions_ptr": "*i64",
                "stride_qt": "i32", "stride_qh": "i32", "stride_kt": "i32", "stride_kh": "i32", "stride_cs": "i32",
                "num_q_heads": "i32", "num_k_heads": "i32"}, dict(HALF=64, BLOCK_H=32, BLOCK_HALF=64)),
    "LoRA shrink": (lora._shrink_kernel,
                    {"x_ptr": "*bf16", "a_ptr": "*bf16", "order_ptr": "*i32", "tiles_ptr": "*i32", "y_ptr": "*fp32",
                     "K": "i32", "R": "i32", "k_per_split": "i32", "num_tiles": "i32", "stride_x": "i32",
                     "stride_as": "i32", "stride_ar": "i32", "stride_ysplit": "i32", "stride_y": "i32"},
                    dict(BLOCK_M=16, BLOCK_R=64, BLOCK_K=lora.BLOCK_K, PRECISION="tf32")),
    "LoRA expand": (lora._expand_kernel,
                    {"y_ptr": "*fp32", "b_ptr": "*bf16", "order_ptr": "*i32", "tiles_ptr": "*i32", "out_ptr": "*bf16",
                     "N": "i32", "R": "i32", "num_tiles": "i32", "stride_y": "i32", "stride_bs": "i32",
                     "stride_bn": "i32", "stride_out": "i32"},
                    dict(BLOCK_M=64, BLOCK_R=64, BLOCK_N=lora.BLOCK_N, PRECISION="tf32")),
    "SiLU-and-mul": (elementwise._silu_and_mul_kernel, _SILU, dict(BLOCK=1024, FP8_OUT=False, STATIC=False)),
    "SiLU-and-mul, fp8 out": (elementwise._silu_and_mul_kernel, dict(_SILU, out_ptr="*fp8e4nv"),
                              dict(BLOCK=16384, FP8_OUT=True, STATIC=False)),
    # As a decode step launches it for a group size under its K tile (a scale per input row).
    "W4A16 GEMM, decode tiles": (w4a16_gemm._w4a16_kernel,
                                 {"x_ptr": "*bf16", "qweight_ptr": "*i32", "scales_ptr": "*bf16", "zeros_ptr": "*bf16",
                                  "g_idx_ptr": "*i32", "out_ptr": "*fp32", "M": "i32", "N": "i32", "K": "i32",
                                  "group_size": "i32", "k_per_split": "i32", "stride_xm": "i32", "stride_om": "i32",
                                  "stride_os": "i32"},
                                 dict(HAS_ZEROS=True, HAS_G_IDX=False, ONE_GROUP_PER_TILE=False, BLOCK_M=16,
                                      BLOCK_N=64, BLOCK_K=128)),
    # Its PTX is what the interpreter cannot check (it emulates it); K split in 8 as for down_proj.
    "W4A16 GEMV": (w4a16_gemv._w4a16_gemv_kernel,
                   {"x_pairs_ptr": "*i32", "qweight_ptr": "*i32", "scales_ptr": "*bf16", "zeros_ptr": "*bf16",
                    "out_ptr": "*bf16", "partials_ptr": "*fp32", "counts_ptr": "*i32", "N": "i32:16",
                    "packed_rows": "i32:16", "words_per_split": "i32:16"},
                   dict(GROUP_WORDS=16, HAS_ZEROS=True, EMULATE=False, BLOCK_N=w4a16_gemv.WIDE.columns,
                        BLOCK_WORDS=w4a16_gemv.WIDE.words, SPLIT=8, SPLIT_POW2=8)),
    "fp8 quantize rows": (elementwise._fp8_quantize_rows_kernel,
                          {"x_ptr": "*bf16", "q_ptr": "*fp8e4nv", "scale_ptr": "*fp32", "stride_x": "i32",
                           "stride_q": "i32", "n_cols": "i32", "fp8_max": "fp32"}, dict(STATIC=False, BLOCK=16384)),
}


# Launch options of the kernels that take others than compile_for_hopper's defaults.
_OPTIONS: dict[str, dict] = {}
# The persistent GEMM as the engine launches it on Hopper, its loads and stores the TMA's: fp8 prefill
# chunks (PERSISTENT_CONFIG) and decode batches (DEFAULT_CONFIG's tiles), a bf16 decode batch's down_proj.
_PERSISTENT_LAUNCHES = {
    "fp8 GEMM, persistent": ("fp8e4nv", fp8_gemm.PERSISTENT_CONFIG),
    "fp8 GEMM, persistent, decode tiles": ("fp8e4nv", fp8_gemm.DEFAULT_CONFIG),
    "bf16 GEMM, persistent, long K": ("bf16", fp8_gemm.LONG_K_16BIT_CONFIG),
}
for _name, (_operand, _config) in _PERSISTENT_LAUNCHES.items():
    _m, _n, _k = _config.block_m, _config.block_n, _config.block_k
    _scale = "*fp32" if _operand == "fp8e4nv" else "*bf16"  # unscaled: not read
    KERNELS[_name] = (fp8_gemm._persistent_gemm_kernel, {
        "a_desc": f"tensordesc<{_operand}[{_m}, {_k}]>", "b_desc": f"tensordesc<{_operand}[{_n}, {_k}]>",
        "out_desc": f"tensordesc<bf16[{_m}, {_n}]>", "a_scale_ptr": _scale, "b_scale_ptr": _scale, "M": "i32",
        "N": "i32", "K": "i32", "programs": "i32",
    }, dict(BLOCK_M=_m, BLOCK_N=_n, BLOCK_K=_k, GROUP_M=fp8_gemm._GROUP_M, SCALED=_operand == "fp8e4nv"))
    _OPTIONS[_name] = dict(num_warps=_config.num_warps, num_stages=_config.num_stages)
# Paged attention as the engine launches it at W1's shapes (8B heads): (longest query, fp8 cache, key splits).
_ATTENTION_LAUNCHES = {
    "paged attention, decode": (1, False, 1), "paged attention, split decode": (1, False, 8),
    "paged attention, prefill": (512, False, 1), "paged attention, fp8 KV decode": (1, True, 1),
    "paged attention, fp8 KV prefill": (512, True, 1), "paged attention, fp8 KV split decode": (1, True, 8),
}
_group, _block_d = _ATTENTION_SHAPE["GROUP"], _ATTENTION_SHAPE["BLOCK_D"]
for _name, (_query_len, _kv_fp8, _splits) in _ATTENTION_LAUNCHES.items():
    _launch = triton_backend._launch_options(_query_len, _kv_fp8, _splits, _block_d)
    _block_q = triton_backend.query_tile(_query_len, _group)
    KERNELS[_name] = (triton_backend._paged_attention_kernel, _FP8_ATTENTION if _kv_fp8 else _ATTENTION, dict(
        _ATTENTION_SHAPE, KV_FP8=_kv_fp8, UPCAST_IN_PTX=_kv_fp8, BLOCK_Q=_block_q, NUM_SPLITS=_splits,
        TILE_N=_launch.pop("tile_n"), **triton_backend._tile_shape(_query_len, _block_q, _group, _block_d)))
    _OPTIONS[_name] = _launch


def compile_for_hopper(
    kernel: triton.JITFunction, signature: dict[str, str], constexprs: dict[str, int], **options: int
) -> triton.compiler.CompiledKernel:
    """The kernel compiled (its forms in `.asm`: "ptx", "cubin", ...; its shared memory in
    `.metadata.shared`); raises the compiler's error."""
    types = {name: kind.removesuffix(":16") for name, kind in signature.items()}
    full = {**types, **{name: "constexpr" for name in constexprs}}
    if set(full) != set(kernel.arg_names):
        raise ValueError(f"{kernel.__name__}: signature differs from the kernel's arguments: {set(full) ^ set(kernel.arg_names)}")
    constants = {(kernel.arg_names.index(name),): value for name, value in constexprs.items()}
    aligned = {
        (kernel.arg_names.index(name),): [["tt.divisibility", 16]] for name, kind in signature.items()
        if kind.startswith("*") or name.startswith("stride") or kind.endswith(":16")
    }
    source = ASTSource(fn=kernel, signature=full, constexprs=constants, attrs=aligned)
    return triton.compile(source, target=HOPPER, options=options)


# Instruction kinds worth counting in a kernel's PTX: how its tiles travel and multiply.
_PTX_KINDS = {
    "global loads, vector": r"ld\.global(?:\.\w+)*\.v\d", "global loads, 8-bit": r"ld\.global(?:\.\w+)*\.[bu]8\b",
    "async copies to shared": r"cp\.async\.c", "shared loads, vector": r"ld\.shared(?:\.\w+)*\.v\d",
    "shared loads, 8-bit": r"ld\.shared(?:\.\w+)*\.[bu]8\b", "ldmatrix": r"ldmatrix",
    "fp8 -> fp16 pair conversions": r"cvt\.rn\.f16x2\.e4m3x2", "mma.sync": r"mma\.sync", "wgmma": r"wgmma\.mma_async",
}


def ptx_counts(ptx: str) -> Counter:
    counts = Counter({kind: len(re.findall(pattern, ptx)) for kind, pattern in _PTX_KINDS.items()})
    # A load issued after the first store, shuffle or barrier waits for its own trip to memory.
    first_wait = re.search(r"st\.global|shfl\.sync|bar\.sync", ptx)
    after = ptx[first_wait.start():] if first_wait else ""
    counts["global loads after the first wait"] = len(re.findall(r"ld\.global", after))
    first_branch = re.search(r"\bbra\b", ptx)
    before = ptx[:first_branch.start()] if first_branch else ptx
    counts["global loads before the first branch"] = len(re.findall(r"ld\.global", before))
    return counts


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ptx", metavar="KERNEL", help="count instruction kinds in this kernel's PTX (a name below)")
    parser.add_argument("--num-warps", type=int, help="default: the engine's launch (or Triton's 4)")
    parser.add_argument("--num-stages", type=int, help="default: the engine's launch (or Triton's 3)")
    args = parser.parse_args()
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("unset TRITON_INTERPRET: the interpreter replaces the kernels this compiles")
    if args.ptx:
        chosen = {"num_warps": args.num_warps, "num_stages": args.num_stages}
        options = {**_OPTIONS.get(args.ptx, {}), **{k: v for k, v in chosen.items() if v is not None}}
        kernel = compile_for_hopper(*KERNELS[args.ptx], **options)
        for kind, count in ptx_counts(kernel.asm["ptx"]).items():
            print(f"{kind}: {count}")
        return
    for name, (kernel, signature, constexprs) in KERNELS.items():
        compiled = compile_for_hopper(kernel, signature, constexprs, **_OPTIONS.get(name, {}))
        print(f"{name}: {len(compiled.asm['cubin'])} bytes of sm_90 code")


if __name__ == "__main__":
    main()
