"""The fp8 KV cache (--kv-cache-dtype fp8 | fp8_e4m3 | fp8_e5m2): the cache write stores
round(x / scale) saturated to the fp8 range and the attention paths read fp8 * scale; the Triton
kernel on an fp8 cache against the torch backend (under TRITON_INTERPRET=1 on the CPU, natively on
the 8B model's head layout on a GPU); a tiny model on the CPU with an fp8 cache: twice the blocks
for the same bytes, prompt logprobs close to the 16/32-bit cache's, prefix caching and preemption
unchanged, the checkpoint's k_scale/v_scale loaded; a 16-bit cache (bfloat16, float16) of a float32
model on the CPU likewise; and each refusal."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

from pagoda import LLM, SamplingParams
from pagoda.attention.kv_fp8 import dequantize, quantize
from pagoda.attention.torch_backend import TorchAttentionBackend, write_kv
from pagoda.config import EngineConfig
from pagoda.layers.attention import Attention
from tests.test_triton_attention import _batch
from tests.tiny_models import save_tiny_model

ON_GPU = torch.cuda.is_available()
# The kernels' dtype: bf16 on a GPU (float32 would run its dots in TF32), float32 in the
# interpreter; the relative error of the output against the torch backend's in each.
DTYPE, TOLERANCE = (torch.bfloat16, 2e-2) if ON_GPU else (torch.float32, 1e-4)
FP8 = [torch.float8_e4m3fn, torch.float8_e5m2]
# Round to nearest: half a unit in the last place, relative (e4m3 keeps 3 mantissa bits, e5m2 2).
HALF_ULP = {torch.float8_e4m3fn: 2**-4, torch.float8_e5m2: 2**-3}


def _inputs(query_lens, prefix_lens, heads, kv_heads, head_dim, block_size, cache_dtype, dtype, seed,
            representable=False):
    """test_triton_attention's batch (on its device) with an fp8 cache whose prefixes hold random
    values, keys 4x and values 0.5x the unit scale (the scales must be applied, not just carried)
    and those scales. representable: new keys and values the cache holds exactly (saturation aside)."""
    q, k, v, cache, metadata = _batch(query_lens, prefix_lens, heads, kv_heads, head_dim, block_size, dtype, seed)
    scales = (torch.tensor(4.0, device=q.device), torch.tensor(0.5, device=q.device))
    k, v = k * scales[0], v * scales[1]
    if representable:  # powers of two: x / scale * scale is exact
        k, v = (dequantize(quantize(x, s, cache_dtype), s, dtype) for x, s in ((k, scales[0]), (v, scales[1])))
    return q, k, v, cache.to(cache_dtype), metadata, scales


def _attend(backend, q, k, v, cache, metadata, scales):
    cache = cache.clone()
    metadata.backend_data = {}
    backend.prepare(metadata)
    return backend.forward(q, k, v, cache, metadata, q.shape[-1] ** -0.5, kv_scales=scales).float(), cache


# The write and read -------------------------------------------------------------------------


@pytest.mark.parametrize("cache_dtype", FP8)
def test_write_stores_scaled_fp8_and_reads_back_within_half_an_ulp(cache_dtype):
    g = torch.Generator().manual_seed(0)
    k = torch.randn(5, 2, 8, generator=g) * 3
    v = torch.randn(5, 2, 8, generator=g) / 8
    k[0, 0, 0] = 1e6  # past the range even after scaling: saturates, never NaN or inf
    k_scale, v_scale = torch.tensor(3.0), torch.tensor(0.125)
    cache = torch.zeros(2, 4, 4, 2, 8, dtype=cache_dtype)
    slots = torch.tensor([13, 2, 7, 0, 9])
    write_kv(k, v, cache, slots, (k_scale, v_scale))

    fp8_max = torch.finfo(cache_dtype).max
    for i, (x, scale) in enumerate(((k, k_scale), (v, v_scale))):
        stored = cache[i].reshape(-1, 2, 8)
        read = dequantize(stored[slots], scale, torch.float32)
        expected = x.clamp(-fp8_max * scale, fp8_max * scale)
        assert torch.isfinite(read).all()
        # Below the smallest normal, subnormals are spaced evenly: half a step there, absolute.
        atol = torch.finfo(cache_dtype).tiny * HALF_ULP[cache_dtype] * scale
        assert ((read - expected).abs() <= expected.abs() * HALF_ULP[cache_dtype] + atol).all()
        others = torch.ones(16, dtype=torch.bool)
        others[slots] = False
        assert (stored[others].float() == 0).all()  # nothing written outside the slots
    assert dequantize(cache[0].reshape(-1, 2, 8)[13, 0, 0], k_scale, torch.float32) == fp8_max * 3.0


@pytest.mark.parametrize("cache_dtype", FP8)
def test_torch_backend_attends_over_the_dequantized_cache(cache_dtype):
    """Attention on an fp8 cache equals attention on a float32 cache holding what the fp8 one
    reads back, for decodes, a chunk over a cached prefix and a whole prompt."""
    q, k, v, cache, metadata, scales = _inputs([1, 6, 9], [20, 11, 0], 4, 2, 16, 4, cache_dtype, torch.float32, 1)
    out, fp8_cache = _attend(TorchAttentionBackend(), q, k, v, cache, metadata, scales)
    as_read = torch.stack([dequantize(fp8_cache[i], scales[i], torch.float32) for i in range(2)])
    k_read = as_read[0].reshape(-1, 2, 16)[metadata.slot_mapping]
    v_read = as_read[1].reshape(-1, 2, 16)[metadata.slot_mapping]
    reference, _ = _attend(TorchAttentionBackend(), q, k_read, v_read, as_read, metadata, None)
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-6)
    unquantized, _ = _attend(TorchAttentionBackend(), q, k, v, as_read, metadata, None)
    assert not torch.equal(out, unquantized)  # the new keys and values went through fp8


# The Triton kernels (natively on a GPU, else under TRITON_INTERPRET=1, as test_triton_attention,
# which skips this module, imported above, where neither is there) ------------------------------

@pytest.mark.parametrize("cache_dtype", [*FP8, torch.float32])
def test_triton_cache_write_matches_torch(cache_dtype):
    """Keys and values sliced out of one fused projection's output (a token stride wider than
    the row), a row of 2 x 24 (not a power of two), values past the fp8 range: the kernel writes
    the bytes torch's write does (the same kernel writes 16/32-bit caches, unscaled)."""
    from pagoda.attention.triton_backend import write_kv as triton_write_kv

    device = "cuda" if ON_GPU else "cpu"
    g = torch.Generator().manual_seed(3)
    qkv = torch.randn(9, 4 * 48, generator=g) * 2
    qkv[0, 96:98] = torch.tensor([1e6, -1e6])
    scales = (torch.tensor(2.0), torch.tensor(0.25))
    k, v = qkv[:, 96:144].view(9, 2, 24), qkv[:, 144:].view(9, 2, 24)
    if not ON_GPU and cache_dtype in FP8:  # see test_triton_on_an_fp8_cache_matches_torch: no rounding in the interpreter
        k, v = (dequantize(quantize(x, s, cache_dtype), s, torch.float32) for x, s in zip((k, v), scales))
    k, v, scales = k.to(device), v.to(device), tuple(s.to(device) for s in scales)
    slots = torch.tensor([30, 2, 17, 0, 9, 31, 4, 22, 11], device=device)
    ours, reference = (torch.zeros(2, 8, 4, 2, 24, dtype=cache_dtype, device=device) for _ in range(2))
    triton_write_kv(k, v, ours, slots, scales)
    write_kv(k, v, reference, slots, scales)
    assert torch.equal(ours.view(torch.uint8), reference.view(torch.uint8))
    limit = torch.finfo(cache_dtype).max if cache_dtype in FP8 else 1e6  # fp8 saturates
    assert ours[0].reshape(-1, 2, 24)[30, 0, :2].float().tolist() == [limit, -limit]


@pytest.mark.parametrize("cache_dtype", FP8)
@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize(
    "query_lens, prefix_lens",
    [([1, 1, 1], [5, 17, 40]), ([1, 7, 20, 1], [33, 0, 9, 0])],
)
# bf16 queries take the kernel's fp16 tile path (a 16-bit model on an fp8 cache), float32 its exact one.
@pytest.mark.parametrize("dtype", [DTYPE] if ON_GPU else [DTYPE, torch.bfloat16])
def test_triton_on_an_fp8_cache_matches_torch(monkeypatch, cache_dtype, num_splits, query_lens, prefix_lens, dtype):
    from pagoda.attention import triton_backend

    if num_splits > 1 and max(query_lens) > 1:
        pytest.skip("only decodes split their keys")
    monkeypatch.setattr(triton_backend, "decode_splits", lambda *args: num_splits)
    # Triton 3.x's interpreter rounds to fp8 without carrying into the exponent (1.97 becomes 1.0,
    # not 2.0): there the keys and values need no rounding; a GPU rounds them like torch.
    inputs = _inputs(query_lens, prefix_lens, 4, 2, 32, 16, cache_dtype, dtype, len(query_lens),
                     representable=not ON_GPU)
    ref, ref_cache = _attend(TorchAttentionBackend(), *inputs)
    out, cache = _attend(triton_backend.TritonAttentionBackend(), *inputs)
    assert torch.equal(cache.view(torch.uint8), ref_cache.view(torch.uint8))
    assert not out.isnan().any()
    assert (out - ref).norm() / ref.norm() < (TOLERANCE if dtype == torch.float32 else 2e-2)


@pytest.mark.parametrize("cache_dtype", FP8)
@pytest.mark.parametrize("query_lens, prefix_lens", [([40, 24], [0, 50]), ([30], [70])])
@pytest.mark.parametrize("dtype", [DTYPE] if ON_GPU else [DTYPE, torch.bfloat16])
def test_long_prefill_on_an_fp8_cache_matches_torch(monkeypatch, cache_dtype, query_lens, prefix_lens, dtype):
    """A step of long chunks only (lowered threshold) goes to the fused-attention path on an fp8
    cache too, reading every key as the cache holds it, and equals the torch backend's."""
    from pagoda.attention import triton_backend

    monkeypatch.setattr(triton_backend, "SDPA_MIN_QUERY_LEN", 24)
    fused_calls = []
    fused = triton_backend.long_prefill_attention
    monkeypatch.setattr(triton_backend, "long_prefill_attention", lambda *a: fused_calls.append(1) or fused(*a))
    # (the interpreter's fp8 rounding: see test_triton_on_an_fp8_cache_matches_torch)
    inputs = _inputs(query_lens, prefix_lens, 8, 2, 32, 16, cache_dtype, dtype, len(query_lens), representable=not ON_GPU)
    ref, ref_cache = _attend(TorchAttentionBackend(), *inputs)
    out, cache = _attend(triton_backend.TritonAttentionBackend(), *inputs)
    assert fused_calls
    assert torch.equal(cache.view(torch.uint8), ref_cache.view(torch.uint8))
    assert (out - ref).norm() / ref.norm() < (TOLERANCE if dtype == torch.float32 else 2e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU")
@pytest.mark.parametrize("cache_dtype", FP8)
@pytest.mark.parametrize(
    "query_lens, prefix_lens",
    [([1] * 8, [100, 700, 31, 2000, 5, 64, 1500, 900]), ([300, 1, 57, 1], [0, 400, 1000, 17])],
    ids=["decode", "prefill"],
)
def test_native_kernel_on_the_8b_head_layout(cache_dtype, query_lens, prefix_lens):
    """32 query heads, 8 KV heads, 128 dims, blocks of 16, bf16 queries: the native kernel's
    output and cache writes against the torch backend's on the GPU."""
    from pagoda.attention.triton_backend import TritonAttentionBackend

    inputs = _inputs(query_lens, prefix_lens, 32, 8, 128, 16, cache_dtype, DTYPE, 8)
    ref, ref_cache = _attend(TorchAttentionBackend(), *inputs)
    out, cache = _attend(TritonAttentionBackend(), *inputs)
    assert torch.equal(cache.view(torch.uint8), ref_cache.view(torch.uint8))
    assert not out.isnan().any()
    assert (out - ref).norm() / ref.norm() < TOLERANCE


# The engine on the CPU -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny_model("llama3", tmp_path_factory.mktemp("kvfp8"))


def _llm(path, **kwargs) -> LLM:
    return LLM(model=str(path), device="cpu", skip_tokenizer_init=True, max_model_len=96, block_size=4, **kwargs)


def _core(llm: LLM):
    return llm.llm_engine.engine_core.engine_core


def _num_blocks(llm: LLM) -> int:
    return _core(llm).scheduler.kv_cache_manager.block_pool.num_blocks


def test_fp8_pool_holds_twice_the_blocks_of_a_bf16_one(tiny, caplog):
    budget = dict(dtype="bfloat16", kv_cache_memory_bytes=1 << 19)
    auto = _llm(tiny, **budget)
    with caplog.at_level(logging.INFO, logger="pagoda"):
        fp8 = _llm(tiny, kv_cache_dtype="fp8", **budget)
    assert _num_blocks(fp8) == 2 * _num_blocks(auto)
    blocks = _num_blocks(fp8)
    assert f"KV pool of {blocks} blocks ({blocks * 4} tokens, float8_e4m3fn)" in caplog.text
    assert {c.dtype for c in _core(fp8).executor.worker.runner.kv_caches} == {torch.float8_e4m3fn}
    out = fp8.generate({"prompt_token_ids": [3, 4, 5]}, SamplingParams(max_tokens=6, ignore_eos=True), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 6


PROMPT = [(7 * i + 3) % 250 + 2 for i in range(60)]
# Teacher-forced, so that a near-tie cannot send the two caches down different continuations
# (greedy tokens could differ from one torch release to the next): each prompt token's logprob
# with an fp8 cache against the float32 cache's. The tiny model's wide random weights make its
# scores sharp, so fp8's rounding of every key and value (up to 6 % in e4m3, 12 % in e5m2) moves
# its logprobs (about -6.7 nats on average here) by ~0.13 nats on average in e4m3, 0.26 in e5m2:
# (mean, max) bounds of twice or so that; a cache that ignored its scales or misread its bytes
# would be off by nats.
LOGPROB_TOLERANCE = {"fp8": (0.25, 0.8), "fp8_e5m2": (0.5, 2.0)}


def _prompt_logprobs(llm: LLM) -> list[float]:
    params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0)
    out = llm.generate({"prompt_token_ids": PROMPT}, params, use_tqdm=False)[0]
    return [position[token].logprob for position, token in zip(out.prompt_logprobs[1:], PROMPT[1:])]


@pytest.mark.parametrize("kv_cache_dtype", ["fp8", "fp8_e5m2"])
def test_prompt_logprobs_stay_close_to_the_float32_cache(tiny, kv_cache_dtype):
    # 16 tokens a step: the prompt is read back from the cache over several chunks.
    reference = torch.tensor(_prompt_logprobs(_llm(tiny, max_num_batched_tokens=16)))
    got = torch.tensor(_prompt_logprobs(_llm(tiny, max_num_batched_tokens=16, kv_cache_dtype=kv_cache_dtype)))
    diff = (got - reference).abs()
    mean, worst = LOGPROB_TOLERANCE[kv_cache_dtype]
    assert 0 < diff.mean() < mean
    assert diff.max() < worst


@pytest.mark.parametrize("kv_cache_dtype, dtype", [("bfloat16", torch.bfloat16), ("float16", torch.float16)])
def test_a_16_bit_cache_of_a_float32_model_holds_twice_its_blocks_close_to_its_logprobs(tiny, kv_cache_dtype, dtype):
    """vLLM's --kv-cache-dtype bfloat16 (and float16) on the CPU: half a float32 cache's bytes a
    token, each key and value rounded to 8 (11) significant bits."""
    budget = dict(kv_cache_memory_bytes=1 << 19, max_num_batched_tokens=16)
    reference, half = _llm(tiny, **budget), _llm(tiny, kv_cache_dtype=kv_cache_dtype, **budget)
    assert _num_blocks(half) == 2 * _num_blocks(reference)
    assert {c.dtype for c in _core(half).executor.worker.runner.kv_caches} == {dtype}
    diff = (torch.tensor(_prompt_logprobs(half)) - torch.tensor(_prompt_logprobs(reference))).abs()
    assert 0 < diff.mean() < (0.03 if dtype == torch.bfloat16 else 0.005)  # measured: 0.0085, 0.00087


def test_prefix_caching_and_preemption_give_the_tokens_of_a_plain_run(tiny):
    prompts = [{"prompt_token_ids": PROMPT[:40] + [i + 2] * 3} for i in range(4)]
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)

    def run(**kwargs):
        llm = _llm(tiny, kv_cache_dtype="fp8", **kwargs)
        tokens = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        return tokens, _core(llm).scheduler

    plain, _ = run(enable_prefix_caching=False, num_gpu_blocks_override=200)
    shared, scheduler = run(num_gpu_blocks_override=200)
    assert shared == plain
    assert scheduler.stats().prefix_cache_hits > 0  # the fp8 blocks of the shared 40 tokens were reused
    # 4 requests of 67 tokens in 40 blocks of 4: some are preempted and recomputed.
    tight, scheduler = run(enable_prefix_caching=False, num_gpu_blocks_override=40)
    assert scheduler.num_preemptions > 0
    assert tight == plain


def _with_kv_scales(path, scales: dict[str, float]):
    checkpoint = path / "model.safetensors"
    tensors = load_file(checkpoint)
    tensors.update({name: torch.tensor(value) for name, value in scales.items()})
    save_file(tensors, checkpoint, metadata={"format": "pt"})
    return path


def _attention_scales(llm: LLM) -> list[tuple[float, float]]:
    model = _core(llm).executor.worker.runner.model
    return [(m.k_scale.item(), m.v_scale.item()) for m in model.modules() if isinstance(m, Attention)]


def test_checkpoint_kv_scales_are_loaded_under_each_name(tmp_path):
    path = _with_kv_scales(save_tiny_model("llama3", tmp_path, num_hidden_layers=4), {
        "model.layers.0.self_attn.k_scale": 0.5, "model.layers.0.self_attn.v_scale": 0.25,
        "model.layers.1.self_attn.k_proj.output_scale": 2.0, "model.layers.1.self_attn.v_proj.output_scale": 4.0,
        "model.layers.2.self_attn.kv_scale": 3.0,
    })
    llm = _llm(path, kv_cache_dtype="fp8")
    assert _attention_scales(llm) == [(0.5, 0.25), (2.0, 4.0), (3.0, 3.0), (1.0, 1.0)]
    out = llm.generate({"prompt_token_ids": PROMPT[:20]}, SamplingParams(max_tokens=4, ignore_eos=True),
                       use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 4


def test_kv_scales_change_what_the_cache_holds(tmp_path):
    """Scales small enough to saturate every key change the logprobs; scales of 1.0 stated in
    the checkpoint do not."""
    base = _prompt_logprobs(_llm(save_tiny_model("llama3", tmp_path / "a"), kv_cache_dtype="fp8"))
    ones = {f"model.layers.{i}.self_attn.{n}": 1.0 for i in range(2) for n in ("k_scale", "v_scale")}
    tiny_k = {f"model.layers.{i}.self_attn.k_scale": 1e-4 for i in range(2)}
    with_ones = _prompt_logprobs(_llm(_with_kv_scales(save_tiny_model("llama3", tmp_path / "b"), ones),
                                      kv_cache_dtype="fp8"))
    saturated = _prompt_logprobs(_llm(_with_kv_scales(save_tiny_model("llama3", tmp_path / "c"), tiny_k),
                                      kv_cache_dtype="fp8"))
    assert with_ones == base
    assert max(abs(a - b) for a, b in zip(saturated, base)) > 0.1


def test_tensor_parallel_ranks_each_hold_the_scales(tmp_path):
    """Two TP ranks, each with half the KV heads, read the checkpoint's scales as one rank does:
    keys scaled down until many saturate, so a rank left at 1.0 would move the logprobs by nats."""
    scales = {f"model.layers.{i}.self_attn.{n}": s for i in range(2) for n, s in (("k_scale", 0.004), ("v_scale", 0.3))}
    path = _with_kv_scales(save_tiny_model("llama3", tmp_path), scales)
    unscaled = _prompt_logprobs(_llm(save_tiny_model("llama3", tmp_path / "plain"), kv_cache_dtype="fp8"))
    one = _prompt_logprobs(_llm(path, kv_cache_dtype="fp8"))
    tp = _llm(path, kv_cache_dtype="fp8", tensor_parallel_size=2)
    try:
        two = _prompt_logprobs(tp)
    finally:
        tp.shutdown()
    assert max(abs(a - b) for a, b in zip(one, unscaled)) > 0.5  # the scales matter here
    # Up to the order of float sums across ranks, which may round a value to the next fp8 step.
    assert two == pytest.approx(one, abs=0.05)


# Refusals ---------------------------------------------------------------------------------


def test_unknown_kv_cache_dtype_is_refused():
    with pytest.raises(ValueError, match=r"kv_cache_dtype='int8' is invalid: must be one of \('auto', 'bfloat16'"):
        EngineConfig(kv_cache_dtype="int8")


def test_fp8_cache_through_the_transformers_fallback_is_refused(tiny):
    with pytest.raises(ValueError, match="kv_cache_dtype='fp8' runs on native architectures only"):
        _llm(tiny, kv_cache_dtype="fp8", model_impl="transformers")


def test_a_16_bit_cache_of_another_dtype_on_a_gpu_is_refused():
    from pagoda.config.resolve import _kv_cache_dtype

    model = SimpleNamespace(dtype=torch.bfloat16, spec=SimpleNamespace(architecture="LlamaForCausalLM"))
    with pytest.raises(ValueError, match=r"kv_cache_dtype='float16' differs from the model's dtype \(torch.bfloat16\)"):
        _kv_cache_dtype("float16", model, torch.device("cuda"))
    assert _kv_cache_dtype("bfloat16", model, torch.device("cuda")) == torch.bfloat16  # the model's own: as auto
    assert _kv_cache_dtype("float16", model, torch.device("cpu")) == torch.float16


def test_fp8_e4m3_on_a_gpu_without_fp8_is_refused():
    from pagoda.config.resolve import _check_triton_fp8_e4m3

    with pytest.raises(ValueError, match=r"kv_cache_dtype='fp8' .* compute capability >= 8.9; this one is 8.0: "
                                         "use --kv-cache-dtype fp8_e5m2"):
        _check_triton_fp8_e4m3("fp8", (8, 0))
    _check_triton_fp8_e4m3("fp8_e4m3", (8, 9))  # Ada and Hopper have fp8


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU")
def test_cuda_graph_decodes_on_an_fp8_cache_match_eager(tmp_path):
    """bf16 model, fp8 cache with checkpoint scales: decodes replayed from CUDA graphs (which read
    the scales from the layers' device tensors) give the eager path's tokens and logprobs; the
    pool holds twice the blocks of a bf16 one in the same bytes."""
    scales = {f"model.layers.{i}.self_attn.{n}": s for i in range(2) for n, s in (("k_scale", 0.5), ("v_scale", 2.0))}
    path = _with_kv_scales(save_tiny_model("qwen3", tmp_path), scales)
    prompts = [{"prompt_token_ids": PROMPT[i : i + 5 + 3 * i]} for i in range(12)]
    params = [SamplingParams(temperature=0.0, max_tokens=4 + i, ignore_eos=True, logprobs=0) for i in range(12)]
    results, blocks = {}, {}
    for kv_cache_dtype, eager in (("fp8", True), ("fp8", False), ("auto", True)):
        llm = LLM(model=str(path), device="cuda", dtype="bfloat16", skip_tokenizer_init=True, max_model_len=256,
                  max_num_seqs=16, kv_cache_memory_bytes=1 << 19, kv_cache_dtype=kv_cache_dtype, enforce_eager=eager)
        assert _attention_scales(llm) == [(0.5, 2.0)] * 2
        blocks[kv_cache_dtype] = _num_blocks(llm)
        results[kv_cache_dtype, eager] = llm.generate(prompts, params, use_tqdm=False)
        llm.shutdown()
    # 64 blocks of 16 tokens in bf16 (8 KiB each), 128 in fp8: below the 256 that 16 requests of 256 tokens could use.
    assert blocks["fp8"] == 2 * blocks["auto"]
    same = total = 0
    for a, b in zip(results["fp8", True], results["fp8", False]):
        total += len(a.outputs[0].token_ids)
        for i, (x, y) in enumerate(zip(a.outputs[0].token_ids, b.outputs[0].token_ids)):
            if x != y:  # a near-tie may flip under another matmul shape: stop comparing there
                break
            same += 1
            assert abs(a.outputs[0].logprobs[i][x].logprob - b.outputs[0].logprobs[i][y].logprob) < 5e-2
    assert same >= 0.9 * total, f"{same}/{total} tokens equal"
