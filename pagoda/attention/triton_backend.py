"""Paged attention in Triton for a flat batch mixing prefill chunks and decodes.

One program per (request, KV head, tile of query tokens). The query heads that share a KV head
are packed into the rows of one tile (rows = query tokens x group), so a decode of a GQA model
still fills a tensor-core tile, and each K/V block is read once for the whole group. Keys are
walked block by block through the request's block table with an online softmax (in base 2);
queries see the cached prefix and, causally, their own chunk, and only the key tiles on a mask's
edge compute it. A sliding-window layer's programs start at the oldest key their window reaches;
a soft-capped layer's scores are capped before the softmax.

A batch of few decodes would leave most of the GPU idle (one request of a model with 8 KV heads
is 8 programs): its keys are then split across programs, each writing a partial softmax (its max,
sum and unnormalised output), and a second kernel combines the splits. The split count depends
only on the batch size and the block tables' width, so decode CUDA graphs capture it.

A step of long prompt chunks alone goes to PyTorch's fused attention instead (see
SDPA_MIN_QUERY_LEN). A chunk after the first attends to its cached prefix and to itself in two such
calls, merged by their log-sum-exps; an fp8 cache's keys and values are dequantized for them.

An fp8 cache (KV_FP8, a compile-time switch: the 16-bit kernel is unchanged) is upcast tile by
tile, to fp16 for 16-bit queries (see _load_queries) and to float32 for float32 ones; its K scale is
folded into the score scale and its V scale applied to the accumulated output, both read from
device tensors so CUDA graphs see the loaded values.
Its keys and values are written by the cache-write kernel, which also scales, saturates and casts
them."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from pagoda.attention.backend import AttentionMetadata
from pagoda.attention.kv_fp8 import dequantize, is_fp8
from pagoda.attention.torch_backend import KVScales, gather_kv
from pagoda.kernels.device_info import has_fp8, num_sms

# The window of a layer that has none: more tokens than any sequence holds (an int32 in the kernel).
_NO_WINDOW = 1 << 30
_LOG2E = tl.constexpr(1.4426950408889634)


# The block-table width changes from step to step; specialising on it (as Triton does on integers
# divisible by 16) would compile the kernel again mid-serving.
@triton.jit(do_not_specialize=["stride_bt"])
def _paged_attention_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, partial_ptr, partial_max_sum_ptr,
    block_tables_ptr, query_start_loc_ptr, seq_lens_ptr, k_scale_ptr, v_scale_ptr,
    scale, window, soft_cap,
    stride_qt, stride_qh,
    stride_cb, stride_cs, stride_ch,
    stride_ot, stride_oh,
    stride_bt,
    GROUP: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_SIZE: tl.constexpr, TILE_N: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, SPLIT_D: tl.constexpr, M: tl.constexpr, NUM_SPLITS: tl.constexpr,
    HAS_SOFT_CAP: tl.constexpr, KV_FP8: tl.constexpr, UPCAST_IN_PTX: tl.constexpr,
):
    req = tl.program_id(0)
    kv_head = tl.program_id(1)
    # The third grid axis walks query tiles x key splits (split decodes have one query tile).
    tile = tl.program_id(2) // NUM_SPLITS
    split = tl.program_id(2) % NUM_SPLITS
    q_start = tl.load(query_start_loc_ptr + req)
    q_len = tl.load(query_start_loc_ptr + req + 1) - q_start
    seq_len = tl.load(seq_lens_ptr + req)  # before the branch waits for q_len: one trip for the three
    if tile * BLOCK_Q >= q_len:
        return
    prefix = seq_len - q_len

    # M rows = BLOCK_Q tokens x GROUP heads, padded to a power of two (groups of 3 or 7 exist).
    rows = tl.arange(0, M)
    q_local = tile * BLOCK_Q + rows // GROUP  # query token within the request
    head = kv_head * GROUP + rows % GROUP
    row_valid = (rows < BLOCK_Q * GROUP) & (q_local < q_len)
    # With SPLIT_D, q, K, V and the output are held in two halves of the head dim, each tile's
    # scores summed over two dots: fewer registers a thread, and prefill tiles run faster so (H100s,
    # W1's prefill step: an fp8 cache 232-234 -> 192-197 us, 16-bit 168-171 -> 136-139 with the
    # stages of _launch_options); a 16-bit decode step slower (224 -> 227 us).
    D_PART: tl.constexpr = BLOCK_D // 2 if SPLIT_D else BLOCK_D
    d = tl.arange(0, D_PART)
    lo_valid = d < HEAD_DIM
    hi_valid = d + D_PART < HEAD_DIM
    q_ptrs = q_ptr + (q_start + q_local)[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :]
    q_lo = _load_queries(q_ptrs, row_valid[:, None] & lo_valid[None, :], KV_FP8)
    if SPLIT_D:
        q_hi = _load_queries(q_ptrs + D_PART, row_valid[:, None] & hi_valid[None, :], KV_FP8)
    if KV_FP8:  # q.k_stored * scale * k_scale = q.k * scale
        scale = scale * tl.load(k_scale_ptr)

    # Scores in base 2 (exp2 is one instruction, exp two): log2(e) goes into the scale, after the cap.
    score_scale = scale if HAS_SOFT_CAP else scale * _LOG2E
    q_pos = prefix + q_local  # absolute position of each query row
    m_i = tl.full([M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([M], dtype=tl.float32)
    acc_lo = tl.zeros([M, D_PART], dtype=tl.float32)
    if SPLIT_D:
        acc_hi = tl.zeros([M, D_PART], dtype=tl.float32)
    # Keys beyond the last query of this tile are masked for every row: stop there.
    last_key = tl.minimum(seq_len, prefix + (tile + 1) * BLOCK_Q)
    # Keys older than the first query's window are masked for every row: start there (a whole
    # tile earlier at most). Without a window, `window` exceeds any position.
    first_key = tl.maximum(0, prefix + tile * BLOCK_Q - window + 1) // TILE_N * TILE_N
    if NUM_SPLITS > 1:  # this program's share: whole key tiles, the last split maybe short or empty
        span = tl.cdiv(tl.cdiv(last_key - first_key, NUM_SPLITS), TILE_N) * TILE_N
        first_key = first_key + split * span
        last_key = tl.minimum(last_key, first_key + span)
    # Tiles in [mask_end, mask_start) are seen whole by every row: none of their keys is past the
    # tile's first query, before its last query's window, or outside this program's keys. Only
    # the tiles outside them (the causal diagonal's, a window's first, a sequence's last) build
    # the mask (an H100, W1's shapes: its prefill step 203 -> 170 us, fp8-cache decode 140 -> 137).
    mask_end = tl.maximum(first_key, prefix + tile * BLOCK_Q + BLOCK_Q - window)
    mask_start = tl.minimum(last_key, prefix + tile * BLOCK_Q + 1)
    # Each iteration reads TILE_N keys, spanning TILE_N / BLOCK_SIZE blocks when blocks are
    # small: larger loads keep more bytes in flight than one 16-token block at a time.
    offs = tl.arange(0, TILE_N)
    # Every tile starts on a block boundary (TILE_N is a multiple of BLOCK_SIZE), so each key's
    # offset within its block is the same in every tile: computed once, leaving the 64-bit block
    # offsets to each tile (W1's decode launch on an fp8 cache 137.7 -> 127.5 us on an H200).
    in_block = (offs % BLOCK_SIZE)[:, None] * stride_cs + kv_head * stride_ch + d[None, :]
    for start in tl.range(first_key, last_key, TILE_N):
        key_pos = start + offs
        in_range = key_pos < last_key
        block_id = tl.load(block_tables_ptr + req * stride_bt + key_pos // BLOCK_SIZE, mask=in_range, other=0)
        kv_off = block_id.to(tl.int64)[:, None] * stride_cb + in_block
        k_lo, v_lo = _load_keys_values(
            k_cache_ptr + kv_off, v_cache_ptr + kv_off, in_range[:, None] & lo_valid[None, :], q_lo.dtype,
            KV_FP8, UPCAST_IN_PTX,
        )
        if SPLIT_D:
            k_hi, v_hi = _load_keys_values(
                k_cache_ptr + kv_off + D_PART, v_cache_ptr + kv_off + D_PART, in_range[:, None] & hi_valid[None, :],
                q_lo.dtype, KV_FP8, UPCAST_IN_PTX,
            )
        s = tl.dot(q_lo, tl.trans(k_lo))
        if SPLIT_D:
            s = tl.dot(q_hi, tl.trans(k_hi), s)
        s = s * score_scale
        if HAS_SOFT_CAP:  # cap * tanh(s / cap), tanh(x) = 2 * sigmoid(2x) - 1
            s = soft_cap * (2.0 * tl.sigmoid(2.0 * s / soft_cap) - 1.0) * _LOG2E
        if (start < mask_end) | (start + TILE_N > mask_start):
            visible = (key_pos[None, :] <= q_pos[:, None]) & (key_pos[None, :] < last_key)
            visible = visible & (key_pos[None, :] > q_pos[:, None] - window)
            s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        # Rows that have seen no key yet keep m = -inf; shift by 0 there to avoid inf - inf.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc_lo = acc_lo * alpha[:, None] + tl.dot(p.to(v_lo.dtype), v_lo)
        if SPLIT_D:
            acc_hi = acc_hi * alpha[:, None] + tl.dot(p.to(v_hi.dtype), v_hi)
        m_i = m_new
    # An fp8 cache: sum(p * v_stored) * v_scale = sum(p * v).
    out_scale = tl.load(v_scale_ptr) if KV_FP8 else 1.0
    if NUM_SPLITS == 1:
        out_scale = out_scale / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        out_rows = out_ptr + (q_start + q_local)[:, None] * stride_ot + head[:, None] * stride_oh
    else:  # a decode's rows are its query heads: [request, split, head] partials, in float32
        part = (req * NUM_SPLITS + split) * (GROUP * tl.num_programs(1)) + head
        out_rows = partial_ptr + part[:, None] * HEAD_DIM
        tl.store(partial_max_sum_ptr + part * 2, m_i, mask=row_valid)
        tl.store(partial_max_sum_ptr + part * 2 + 1, l_i, mask=row_valid)
    out_dtype = out_rows.dtype.element_ty
    tl.store(out_rows + d[None, :], (acc_lo * out_scale).to(out_dtype), mask=row_valid[:, None] & lo_valid[None, :])
    if SPLIT_D:
        tl.store(
            out_rows + D_PART + d[None, :], (acc_hi * out_scale).to(out_dtype),
            mask=row_valid[:, None] & hi_valid[None, :],
        )


@triton.jit
def _load_queries(ptrs, mask, KV_FP8: tl.constexpr):
    """A tile of queries, in fp16 against an fp8 cache's 16-bit tiles: Hopper converts fp8 pairs to
    fp16 in one instruction, to bf16 only through fp16 per element, which bounded the kernel (1.4
    TB/s of fp8 K/V). fp16 holds every fp8 value and more of q's mantissa than bf16; q is clamped
    to its range."""
    q = tl.load(ptrs, mask=mask, other=0.0)
    if KV_FP8 and q.dtype != tl.float32:
        q = tl.clamp(q.to(tl.float32), -65504.0, 65504.0).to(tl.float16)
    return q


@triton.jit
def _load_keys_values(k_ptrs, v_ptrs, mask, dtype: tl.constexpr, KV_FP8: tl.constexpr, UPCAST_IN_PTX: tl.constexpr):
    """A tile of keys and values, an fp8 cache's upcast to the queries' dtype."""
    k = tl.load(k_ptrs, mask=mask, other=0.0)
    v = tl.load(v_ptrs, mask=mask, other=0.0)
    if KV_FP8:
        k = k.to(dtype)
        v = _upcast_values(v, dtype, UPCAST_IN_PTX)
    return k, v


# fp8 pairs to fp16 pairs, four values (one 32-bit register) at a time.
_E4M3_TO_FP16_PTX = (
    "{ .reg .b16 lo, hi; mov.b32 {lo, hi}, $2; cvt.rn.f16x2.e4m3x2 $0, lo; cvt.rn.f16x2.e4m3x2 $1, hi; }"
)
_E4M3_TO_FP16 = tl.constexpr(_E4M3_TO_FP16_PTX)
_E5M2_TO_FP16 = tl.constexpr(_E4M3_TO_FP16_PTX.replace("e4m3", "e5m2"))


@triton.jit
def _upcast_values(v, dtype: tl.constexpr, UPCAST_IN_PTX: tl.constexpr):
    """An fp8 V tile in `dtype`. p @ v multiplies along v's rows (keys), which an 8-bit tile in
    shared memory gives only a byte at a time (Hopper's ldmatrix transposes 16-bit tiles alone),
    and Triton moves a plain cast (or pure inline PTX) past the shared-memory copy to save bytes.
    Converted in impure inline PTX, the tile is stored as fp16 and read with ldmatrix instead: no
    byte loads in the sm_90 PTX."""
    if UPCAST_IN_PTX and dtype == tl.float16:
        ptx: tl.constexpr = _E5M2_TO_FP16 if v.dtype == tl.float8e5 else _E4M3_TO_FP16
        return tl.inline_asm_elementwise(ptx, "=r,=r,r", [v], dtype=tl.float16, is_pure=False, pack=4)
    return v.to(dtype)


@triton.jit
def _write_kv_kernel(
    k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_mapping_ptr, k_scale_ptr, v_scale_ptr,
    stride_kt, stride_kh, stride_vt, stride_vh,
    HEAD_DIM: tl.constexpr, ROW: tl.constexpr, BLOCK: tl.constexpr, FP8_MAX: tl.constexpr, KV_FP8: tl.constexpr,
):
    """One program per token: its keys and values [Hkv, D] into its slot of the (contiguous)
    cache; into an fp8 cache divided by their scales and saturated to the fp8 range."""
    token = tl.program_id(0)
    i = tl.arange(0, BLOCK)
    valid = i < ROW
    head, d = i // HEAD_DIM, i % HEAD_DIM
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    k = tl.load(k_ptr + token * stride_kt + head * stride_kh + d, mask=valid)
    v = tl.load(v_ptr + token * stride_vt + head * stride_vh + d, mask=valid)
    if KV_FP8:
        # Rounded division, as torch divides: fp32 `/` is approximate in Triton.
        k = tl.clamp(tl.math.div_rn(k.to(tl.float32), tl.load(k_scale_ptr)), -FP8_MAX, FP8_MAX)
        v = tl.clamp(tl.math.div_rn(v.to(tl.float32), tl.load(v_scale_ptr)), -FP8_MAX, FP8_MAX)
    tl.store(k_cache_ptr + slot * ROW + i, k.to(k_cache_ptr.dtype.element_ty), mask=valid)
    tl.store(v_cache_ptr + slot * ROW + i, v.to(v_cache_ptr.dtype.element_ty), mask=valid)


def write_kv(
    k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor, kv_scales: KVScales = None
) -> None:
    """k, v: [T, Hkv, D] (unit stride along D) into their slots in one launch; an fp8 cache gets
    them divided by its scales (None: 1.0). One pass: torch's stack + index_copy_ took 134 us a
    layer for an 8,192-token chunk of the 8B shape on an H200."""
    kv_fp8 = is_fp8(kv_cache.dtype)
    k_scale, v_scale = (kv_scales or _unit_scales(k.device)) if kv_fp8 else (slot_mapping, slot_mapping)  # not read
    num_kv_heads, head_dim = k.shape[1], k.shape[2]
    row = num_kv_heads * head_dim
    _write_kv_kernel[(k.shape[0],)](
        k, v, kv_cache[0], kv_cache[1], slot_mapping, k_scale, v_scale,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        HEAD_DIM=head_dim, ROW=row, BLOCK=triton.next_power_of_2(row),
        FP8_MAX=torch.finfo(kv_cache.dtype).max if kv_fp8 else 0.0, KV_FP8=kv_fp8,
    )


@triton.jit
def _combine_splits_kernel(
    partial_ptr, partial_max_sum_ptr, out_ptr, query_start_loc_ptr, stride_ot, stride_oh,
    NUM_SPLITS: tl.constexpr, SPLITS_POW2: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One program per (decode, query head): the splits' partial softmaxes rescaled to their common
    max and summed."""
    req = tl.program_id(0)
    head = tl.program_id(1)
    split = tl.arange(0, SPLITS_POW2)
    valid = split < NUM_SPLITS
    part = (req * NUM_SPLITS + split) * tl.num_programs(1) + head
    d = tl.arange(0, BLOCK_D)
    d_valid = d < HEAD_DIM
    # Every load comes first, so that they make one trip to memory (a batch-1 decode waits for it).
    token = tl.load(query_start_loc_ptr + req)
    m = tl.load(partial_max_sum_ptr + part * 2, mask=valid, other=float("-inf"))
    l = tl.load(partial_max_sum_ptr + part * 2 + 1, mask=valid, other=0.0)
    acc = tl.load(partial_ptr + part[:, None] * HEAD_DIM + d[None, :], mask=valid[:, None] & d_valid[None, :], other=0.0)
    weight = tl.math.exp2(m - tl.max(m, axis=0))  # maxima in base 2; an empty split (m = -inf) weighs 0
    out = tl.sum(acc * weight[:, None], axis=0) / tl.sum(l * weight, axis=0)
    tl.store(out_ptr + token * stride_ot + head * stride_oh + d, out.to(out_ptr.dtype.element_ty), mask=d_valid)


def paged_attention(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    metadata: AttentionMetadata,
    scale: float,
    block_q: int,
    num_splits: int = 1,
    sliding_window: int | None = None,
    logits_soft_cap: float | None = None,
    kv_scales: KVScales = None,
) -> torch.Tensor:
    """q: [T, Hq, D]; kv_cache: [2, num_blocks, block_size, Hkv, D] -> [T, Hq, D]. num_splits > 1
    (decodes only) splits each request's keys across that many programs. kv_scales: an fp8
    cache's K and V scales (None: 1.0)."""
    num_heads, head_dim = q.shape[1], q.shape[2]
    _, _, block_size, num_kv_heads, _ = kv_cache.shape
    out = torch.empty_like(q)
    max_query_len = max(metadata.query_lens_cpu)
    assert num_splits == 1 or max_query_len == 1, "only decodes split their keys"
    num_reqs = metadata.num_reqs
    grid = (num_reqs, num_kv_heads, num_splits if num_splits > 1 else triton.cdiv(max_query_len, block_q))
    k_cache, v_cache = kv_cache[0], kv_cache[1]
    block_d = max(16, triton.next_power_of_2(head_dim))  # tl.dot needs K >= 16
    kv_fp8 = is_fp8(kv_cache.dtype)
    options = _launch_options(max_query_len, kv_fp8, num_splits, block_d)
    tile_n = max(block_size, options.pop("tile_n"))
    # V upcast in PTX costs a trip through shared memory and saves byte loads (an H100: W1's decode
    # step, one warp, 132.7 -> 129.7 us; split decodes of 4 x 32,768 keys, two warps, 155 -> 143).
    upcast_in_ptx = kv_fp8 and has_fp8(q.device)
    assert tile_n % block_size == 0, "key tiles start on block boundaries"
    if num_splits > 1:
        partial = torch.empty(num_reqs, num_splits, num_heads, head_dim, dtype=torch.float32, device=q.device)
        partial_max_sum = torch.empty(num_reqs, num_splits, num_heads, 2, dtype=torch.float32, device=q.device)
    else:
        partial = partial_max_sum = out  # not read
    k_scale, v_scale = (kv_scales or _unit_scales(q.device)) if kv_fp8 else (out, out)  # not read unscaled
    _paged_attention_kernel[grid](
        q, k_cache, v_cache, out, partial, partial_max_sum,
        metadata.block_tables, metadata.query_start_loc, metadata.seq_lens, k_scale, v_scale,
        scale, sliding_window or _NO_WINDOW, logits_soft_cap or 0.0,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        out.stride(0), out.stride(1),
        metadata.block_tables.stride(0),
        GROUP=num_heads // num_kv_heads, BLOCK_Q=block_q, BLOCK_SIZE=block_size, TILE_N=tile_n,
        HEAD_DIM=head_dim, BLOCK_D=block_d, **_tile_shape(max_query_len, block_q, num_heads // num_kv_heads, block_d),
        NUM_SPLITS=num_splits,
        HAS_SOFT_CAP=logits_soft_cap is not None, KV_FP8=kv_fp8, UPCAST_IN_PTX=upcast_in_ptx, **options,
    )
    if num_splits > 1:
        _combine_splits_kernel[(num_reqs, num_heads)](
            partial, partial_max_sum, out, metadata.query_start_loc, out.stride(0), out.stride(1),
            NUM_SPLITS=num_splits, SPLITS_POW2=triton.next_power_of_2(num_splits), HEAD_DIM=head_dim, BLOCK_D=block_d,
        )
    return out


def _tile_shape(max_query_len: int, block_q: int, group: int, block_d: int) -> dict[str, int | bool]:
    """The kernel's tile rows (M: query tokens x group, padded to a power of two, at least one
    tensor-core tile) and whether it holds the head dim in halves (SPLIT_D: prefill tiles)."""
    return {"M": max(16, triton.next_power_of_2(block_q * group)), "SPLIT_D": max_query_len > 1 and block_d >= 32}


def _launch_options(max_query_len: int, kv_fp8: bool, num_splits: int, block_d: int) -> dict[str, int]:
    """Keys a program reads per iteration (tile_n), warps and pipeline stages. Prefill tiles on an
    H100 at W1's prefill step (16 prompts of 512 tokens; `scripts/bench_attention.py --launch-sweep
    prefill`), with their head dim in halves: two stages, four warps; a 16-bit cache 136 us in
    32-key tiles against 164 with three stages and 179 in 64-key tiles; an fp8 cache 159 us in
    64-key tiles against 185 in 32-key ones and 188 with three stages. Decodes on an H200 at W1's
    decode step (256 requests x 512-768 keys, 8B heads; `--launch-sweep decode`): a 16-bit cache
    166 us in 64-key tiles with 2 stages against 176 with Triton's default 3; an fp8 cache 122 us
    in 32-key tiles with one warp against 127.5 in 64-key tiles with two and 172 with four (split
    decodes, few programs of long contexts, keep two warps: one would leave the SMs with too few
    warps to hide latency). A head dim over 128 takes 32-key tiles."""
    if max_query_len > 1:
        return {"tile_n": 64 if kv_fp8 and block_d <= 128 else 32, "num_warps": 4, "num_stages": 2}
    tile_n = 64 if block_d <= 128 else 32
    if not kv_fp8:
        return {"tile_n": tile_n, "num_warps": 4, "num_stages": 2}
    if num_splits == 1 and block_d <= 128:
        return {"tile_n": 32, "num_warps": 1, "num_stages": 3}
    return {"tile_n": tile_n, "num_warps": 2, "num_stages": 3}


def _unit_scales(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The K and V scales of an fp8 cache given none (direct kernel calls)."""
    one = torch.ones((), dtype=torch.float32, device=device)
    return one, one


def decode_splits(num_programs: int, max_keys: int, num_sms: int) -> int:
    """Key splits per decode: enough programs to fill the GPU about twice over, each split at
    least 128 keys, at most 64. On an H100 under CUDA graphs, 128-key splits were the fastest at
    every size measured for batches of 1 to 16 (scripts/bench_attention.py); 32 requests or more
    fill the GPU unsplit."""
    return max(1, min((2 * num_sms) // num_programs, max_keys // 128, 64))


def query_tile(max_query_len: int, group: int) -> int:
    """Query tokens per program: decodes pack the group into >= 16 rows (the smallest tensor-core
    tile); short queries (a decode with a few draft tokens) into 16 or 32 rows, so that their tile
    is not mostly padding; longer prefills use 64-row tiles. Three tile shapes at most, so steps
    of varying query lengths do not compile the kernel again."""
    rows = max(16, triton.next_power_of_2(max_query_len * group))
    return max(1, min(rows, 64) // group)


# A step of long prompt chunks only (a long prompt's time to first token) runs them through
# PyTorch's fused attention (cuDNN / FlashAttention on Hopper): ~2.5x the paged kernel's rate there
# (a 32,000-token prompt on an H200: 0.45 s of attention against 1.2 s). Shorter chunks, and any step
# with decodes, stay in the paged kernel, one launch for the batch.
SDPA_MIN_QUERY_LEN = 2048


class TritonAttentionBackend:
    def prepare(self, metadata: AttentionMetadata) -> None:
        metadata.backend_data["max_query_len"] = max(metadata.query_lens_cpu)
        metadata.backend_data["long_prefill"] = min(metadata.query_lens_cpu) >= SDPA_MIN_QUERY_LEN
        metadata.backend_data["after_prefix"] = metadata.seq_lens_cpu != metadata.query_lens_cpu

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_cache: torch.Tensor,
        metadata: AttentionMetadata,
        scale: float,
        *,
        sliding_window: int | None = None,
        logits_soft_cap: float | None = None,
        kv_scales: KVScales = None,
    ) -> torch.Tensor:
        write_kv(k, v, kv_cache, metadata.slot_mapping, kv_scales)
        if (
            metadata.backend_data["long_prefill"] and sliding_window is None and logits_soft_cap is None
            and (not metadata.backend_data["after_prefix"] or _has_attention_with_lse(q.device, q.shape[-1], q.dtype))
        ):
            return long_prefill_attention(q, k, v, kv_cache, metadata, scale, kv_scales)
        group = q.shape[1] // k.shape[1]
        max_query_len = metadata.backend_data["max_query_len"]
        num_splits = 1
        if max_query_len == 1:
            # The longest a request here can be: what its block table holds (a graph's tables
            # are max_model_len wide, so its captured split count suits any length).
            max_keys = metadata.block_tables.shape[1] * metadata.block_size
            num_splits = decode_splits(metadata.num_reqs * k.shape[1], max_keys, num_sms(q.device))
        return paged_attention(
            q, kv_cache, metadata, scale, query_tile(max_query_len, group), num_splits=num_splits,
            sliding_window=sliding_window, logits_soft_cap=logits_soft_cap, kv_scales=kv_scales,
        )


def long_prefill_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, metadata: AttentionMetadata,
    scale: float, kv_scales: KVScales = None,
) -> torch.Tensor:
    """Each request's chunk through PyTorch's fused attention: causally against its own keys, and a
    later chunk also against its cached prefix (read back from the paged cache), unmasked; the two
    softmaxes merged by their log-sum-exps. One call with a lower-right causal mask would go to
    FlashAttention rather than cuDNN on Hopper: a 131,000-token prompt's first token took 15.5 s
    that way on an H200, against transformers' 11.4 s with one causal call. An fp8 cache's keys
    and values, the chunk's own included, are read back as it holds them (dequantized), as the
    paged kernel reads them."""
    out = torch.empty_like(q)
    fp8 = is_fp8(kv_cache.dtype)
    for i, (start, length, seq_len) in enumerate(
        zip(metadata.query_starts_cpu, metadata.query_lens_cpu, metadata.seq_lens_cpu)
    ):
        rows = slice(start, start + length)
        query, keys, values = (x[rows].transpose(0, 1).unsqueeze(0) for x in (q, k, v))  # [1, heads, tokens, D]
        prefix_len = seq_len - length
        if fp8:
            cached = _cached_keys_values(kv_cache, metadata, i, seq_len, kv_scales, q.dtype)
            keys, values = (x[:, :, prefix_len:] for x in cached)
        if prefix_len == 0:
            attended = F.scaled_dot_product_attention(query, keys, values, is_causal=True, scale=scale, enable_gqa=True)
        else:
            if not fp8:
                cached = _cached_keys_values(kv_cache, metadata, i, prefix_len, kv_scales, q.dtype)
            prefix_keys, prefix_values = (x[:, :, :prefix_len] for x in cached)
            own, own_lse = _attention_with_lse(query, keys, values, scale, causal=True)
            old, old_lse = _attention_with_lse(query, prefix_keys, prefix_values, scale, causal=False)
            # softmax over both key sets = each part weighted by its share of the total exp-sum
            own_share = torch.sigmoid(own_lse - old_lse).view(*own_lse.shape[:3], 1)
            attended = old.float().lerp_(own.float(), own_share)
        out[rows] = attended[0].transpose(0, 1)
    return out


def _cached_keys_values(
    kv_cache: torch.Tensor, metadata: AttentionMetadata, request: int, length: int, kv_scales: KVScales,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A request's first `length` cached keys and values [1, Hkv, length, D] in `dtype` (an fp8
    cache's dequantized)."""
    tables = metadata.block_tables[request : request + 1, : -(-length // metadata.block_size)]
    keys, values = (x[:, :, :length] for x in gather_kv(kv_cache, tables))
    if not is_fp8(kv_cache.dtype):
        return keys, values
    k_scale, v_scale = kv_scales or (None, None)
    return dequantize(keys, k_scale, dtype), dequantize(values, v_scale, dtype)


@functools.cache
def _has_attention_with_lse(device: torch.device, head_dim: int, dtype: torch.dtype) -> bool:
    """Whether _attention_with_lse runs here: cuDNN's fused attention needs cuDNN 9, compute
    capability 8.0, 16-bit inputs and head dims that are multiples of 8 (PyTorch's own conditions
    for it); head dims up to 256 ran on an H200 (GQA, its log-sum-exp exact to 1e-6), up to 128
    elsewhere. Otherwise chunks over a cached prefix stay in the paged kernel."""
    if device.type != "cuda":
        return True
    capability = torch.cuda.get_device_capability(device)
    return (
        torch.backends.cudnn.is_available() and torch.backends.cudnn.version() >= 90000
        and capability >= (8, 0) and dtype in (torch.float16, torch.bfloat16)
        and head_dim % 8 == 0 and head_dim <= (256 if capability >= (9, 0) else 128)
    )


def _attention_with_lse(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float, causal: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused attention [1, heads, tokens, D] (GQA: fewer key heads) and its log-sum-exp [1, heads,
    tokens] (natural log of each row's exp-sum; cuDNN's has a trailing dimension of 1): cuDNN on a
    GPU, the flash kernel on the CPU."""
    if query.is_cuda:
        out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(
            query, keys, values, None, True, 0.0, causal, False, scale=scale
        )[:2]
    else:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            query, keys, values, 0.0, causal, scale=scale
        )
    return out, lse
