"""GGUF weights kept quantized on the CPU (`--quantization gguf`): the blocks of Q4_0, Q4_1 and
Q4_K unpack to exactly what gguf's own dequantizer gives; the int4 kernel path equals the
reference (dequantize, then matmul) at real models' shapes; Q8_0 and other types are
dequantized; packed layers and tensor-parallel shards load through the loader's slicing; a tiny
GGUF model gives the tokens of its dequantized conversion and of TP=2; the default model's
quantized path gives the fp32 path's greedy tokens on the README's prompts (through Pagoda's C int4
matmul, int16 activations; torch's kernel, in bfloat16, may part from them after a near-tie)."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from pagoda import LLM, SamplingParams
from pagoda.config import EngineConfig
from pagoda.config.resolve import resolve_config
from pagoda.distributed.parallel_state import GroupInfo
from pagoda.kernels import cpu_native
from pagoda.layers import linear
from pagoda.layers.linear import (
    ColumnParallelLinear,
    RowParallelLinear,
    Shard,
    UnquantizedLinearMethod,
)
from pagoda.loader.gguf_blocks import dequantize_parts, unpack_blocks
from pagoda.loader.gguf_loader import convert_gguf_to_hf_dir
from pagoda.loader.model_resolver import resolve_model
from pagoda.quantization import get_quantization_config
from pagoda.quantization.gguf import GGUFInt4LinearMethod
from tests.test_gguf import TinyModel, write_tiny_gguf
from tests.test_int4pack import assert_bf16_close, assert_same_greedy, rows_of

Q = gguf.GGMLQuantizationType


@pytest.fixture(autouse=True)
def gguf_cache_dir(tmp_path, monkeypatch):
    """GGUF files run kept quantized write their cache entry (loader/gguf_cache.py) here, not in ~/.cache."""
    monkeypatch.setenv("PAGODA_CACHE_DIR", str(tmp_path / "cache"))
INT4 = ["Q4_0", "Q4_1", "Q4_K"]
# (N, K): SmolLM2-135M's k/v, gate/up and down projections; Llama-8B-like widths.
SHAPES = [(192, 576), (1536, 576), (576, 1536), (256, 4096)]


def random_blocks(type_name: str, n: int, k: int, seed: int) -> np.ndarray:
    """A tensor's raw blocks, uint8 [n, bytes per row]: random bytes with sane float16 scales."""
    block_size, type_size = gguf.GGML_QUANT_SIZES[Q[type_name]]
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, size=(n * k // block_size, type_size), dtype=np.uint8)
    halves = {"Q4_0": 1, "Q4_1": 2, "Q4_K": 2}[type_name]  # d (and m / dmin) lead each block
    blocks[:, : 2 * halves] = rng.uniform(1e-3, 2e-2, size=(len(blocks), halves)).astype(np.float16).view(np.uint8)
    return blocks.reshape(n, -1)


def layer_of(method, k: int, n: int, parts: dict[str, torch.Tensor]) -> ColumnParallelLinear:
    layer = ColumnParallelLinear(k, {"w": Shard(0, n, n)}, linear_method=method)
    for name, tensor in parts.items():
        layer.load_weight(name, tensor, "w")
    method.process_weights_after_loading(layer)
    return layer


@pytest.mark.parametrize("type_name", INT4)
def test_unpacked_blocks_dequantize_as_gguf_does(type_name):
    raw = random_blocks(type_name, 8, 512, seed=1)
    expected = gguf.quants.dequantize(raw, Q[type_name])
    torch.testing.assert_close(dequantize_parts(unpack_blocks(raw, type_name)), torch.from_numpy(expected), rtol=0,
                               atol=0)


@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("type_name", INT4)
def test_int4_kernel_equals_the_reference(type_name, n, k):
    if type_name == "Q4_K" and k % 256:
        pytest.skip("Q4_K rows are whole 256-value super-blocks")
    parts = unpack_blocks(random_blocks(type_name, n, k, seed=n + k), type_name)
    layer = layer_of(GGUFInt4LinearMethod(), k, n, parts)
    reference = dequantize_parts(parts)
    for rows in (1, 7, 65):
        # Fixed draws: Q4_1's weights are all positive, so a row of x summing near zero makes a
        # small product that bfloat16's rounding of x misses by more than 5e-3 (5 % of draws).
        x = rows_of(k, rows)
        assert_bf16_close(layer(x), x @ reference.t())
    assert not hasattr(layer, "qweight")  # the unpacked copy is freed after repacking


@pytest.mark.parametrize("type_names", [("Q4_0", "Q4_1", "Q4_1"), ("Q4_K", "Q4_K", "Q4_0")])
def test_packed_layer_of_mixed_4bit_parts(type_names):
    """q|k|v with parts of different 4-bit types: one int4 layer, each part at its offset."""
    k, sizes = 512, [128, 64, 64]
    parts = [unpack_blocks(random_blocks(t, n, k, seed=i), t) for i, (t, n) in enumerate(zip(type_names, sizes))]
    names = ["q", "k", "v"]
    method = GGUFInt4LinearMethod()
    layer = ColumnParallelLinear(k, {p: Shard(0, n, n) for p, n in zip(names, sizes)}, linear_method=method)
    for part, tensors in zip(names, parts):
        for name, tensor in tensors.items():
            layer.load_weight(name, tensor, part)
    method.process_weights_after_loading(layer)
    x = rows_of(k, 3)
    whole = torch.cat([dequantize_parts(p) for p in parts])
    assert_bf16_close(layer(x), x @ whole.t())


@pytest.mark.parametrize("type_name", INT4)
def test_tp2_shards_sum_to_the_whole(monkeypatch, type_name):
    """Column shards side by side and row shards summed give the unsharded product."""
    n, k = 128, 1024
    parts = unpack_blocks(random_blocks(type_name, n, k, seed=3), type_name)
    x = rows_of(k, 2)
    reference = x @ dequantize_parts(parts).t()
    columns, row_total = [], torch.zeros(2, n)
    for rank in range(2):
        monkeypatch.setattr(linear, "tp_group", lambda rank=rank: GroupInfo(rank, 2))
        column = ColumnParallelLinear(k, {"w": Shard(rank * n // 2, n // 2, n)}, linear_method=GGUFInt4LinearMethod())
        row = RowParallelLinear(k, n, linear_method=GGUFInt4LinearMethod())
        for name, tensor in parts.items():
            column.load_weight(name, tensor, "w")
            row.load_weight(name, tensor)
        for layer in (column, row):
            layer.linear_method.process_weights_after_loading(layer)
        columns.append(column(x))
        shard = row.input_shard
        row_total += row.linear_method.apply(row, x[:, shard.start : shard.start + shard.size].contiguous(), None)
    assert_bf16_close(torch.cat(columns, dim=1), reference)
    assert_bf16_close(row_total, reference)


def test_config_picks_a_method_per_layer_by_its_parts_types():
    config = get_quantization_config("gguf", {"quant_method": "gguf", "tensor_types": {
        "m.q_proj": "Q4_K", "m.k_proj": "Q4_K", "m.v_proj": "Q6_K", "m.o_proj": "Q4_0",
        "m.gate_proj": "Q4_1", "m.up_proj": "Q4_0", "m.down_proj": "Q8_0",
    }})
    config.packed_modules_mapping = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}
    assert isinstance(config.linear_method("m.qkv_proj"), UnquantizedLinearMethod)  # Q6_K part: dequantized
    assert isinstance(config.linear_method("m.o_proj"), GGUFInt4LinearMethod)
    assert isinstance(config.linear_method("m.gate_up_proj"), GGUFInt4LinearMethod)
    assert isinstance(config.linear_method("m.down_proj"), UnquantizedLinearMethod)  # Q8_0: dequantized
    assert config.kept_modules == {"m.o_proj", "m.gate_proj", "m.up_proj"}


def test_gguf_flag_on_a_checkpoint_that_is_not_gguf_is_refused():
    with pytest.raises(ValueError, match="quantization='gguf' runs GGUF models only"):
        get_quantization_config("gguf", None)


@pytest.mark.parametrize("stated, cached", [
    ("auto", torch.float16),  # as llama.cpp's cache
    ("float32", torch.float32),
    ("bfloat16", torch.bfloat16),
])
def test_a_gguf_models_cache_on_the_cpu_is_float16_by_default(tmp_path, stated, cached):
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, TinyModel(hidden=256, intermediate=512), Q.Q4_K)
    args = EngineConfig(model=str(path), device="cpu", skip_tokenizer_init=True, kv_cache_dtype=stated)
    config = resolve_config(args, resolve_model(str(path)))
    assert (config.model.dtype, config.cache.dtype) == (torch.float32, cached)


def test_a_float32_checkpoints_cache_on_the_cpu_is_float32_by_default(tmp_path):
    # The same model's float32 conversion: no GGUF, so auto is the model's dtype.
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, TinyModel(hidden=256, intermediate=512), Q.Q4_K)
    dense = convert_gguf_to_hf_dir(path, tmp_path / "hf")
    config = resolve_config(EngineConfig(model=str(dense), device="cpu", skip_tokenizer_init=True),
                            resolve_model(str(dense)))
    assert config.cache.dtype == config.model.dtype == torch.float32


def _generate(model: str, prompts: list[list[int]], **kwargs) -> list:
    llm = LLM(model=model, device="cpu", skip_tokenizer_init=True, max_model_len=128, **kwargs)
    try:
        outputs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                               SamplingParams(temperature=0, max_tokens=8, logprobs=2), use_tqdm=False)
    finally:
        llm.shutdown()
    return [o.outputs[0] for o in outputs]


@pytest.mark.slow
def test_tiny_gguf_model_equals_its_dequantized_conversion_and_tp2(tmp_path):
    # Q4_K: write_tiny_gguf's other types hold unscaled N(0, 1) weights, whose residual stream
    # reaches norms of ~85,000 after one layer (the embeddings': 16), where bfloat16's relative
    # rounding moves logits by nats; its Q4_K blocks (scales 1e-3) stay near 1,800.
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, TinyModel(hidden=256, intermediate=512), Q.Q4_K)
    prompts = [[5, 80, 13, 200, 7], [42, 42, 9]]
    quantized = _generate(str(path), prompts)
    dense = _generate(str(convert_gguf_to_hf_dir(path, tmp_path / "hf")), prompts)
    tp2 = _generate(str(path), prompts, tensor_parallel_size=2)
    for ours, reference, other_rank_split in zip(quantized, dense, tp2):
        assert_same_greedy(ours, reference)
        assert_same_greedy(other_rank_split, ours)


# The README's prompts (quick start: chat and `pagoda generate`) and a longer answer.
README_CHATS = [[{"role": "user", "content": "What is the capital of France?"}],
                [{"role": "user", "content": "Write a haiku about the sea."}]]
README_PROMPTS = ["What is the capital of France?"]


def _default_model_outputs(**engine_args) -> list:
    llm = LLM(device="cpu", max_model_len=512, **engine_args)
    params = SamplingParams(temperature=0, max_tokens=64, logprobs=2)
    try:
        outputs = llm.chat(README_CHATS, params, use_tqdm=False) + llm.generate(README_PROMPTS, params, use_tqdm=False)
        return [o.outputs[0] for o in outputs]
    finally:
        llm.shutdown()


@pytest.mark.slow
def test_default_model_quantized_greedy_tokens_equal_the_fp32_path(loader_default_model_dir, int4_activations,
                                                                   monkeypatch):
    """By default: weights from the shipped Q4_1 GGUF, kept quantized; load_format='safetensors': the
    float32 conversion. With float32 caches both, greedy tokens agree through the C matmul's int16
    activations; through its int8 ones (AVX2), or torch's int4 kernel (no AVX512-VNNI or AVX2), they
    part only after a near-tie of the float32 path's logits. The GGUF model's default float16 cache
    parts from its float32 one only after a near-tie too (the haiku's, at 0.066 nats)."""
    monkeypatch.setenv("PAGODA_CACHE_DIR", str(loader_default_model_dir.parents[1]))
    quantized = _default_model_outputs(kv_cache_dtype="float32")
    dense = _default_model_outputs(load_format="safetensors")
    for ours, reference in zip(quantized, dense):
        if cpu_native.int_matmuls_available() and int4_activations == "int16":
            assert ours.token_ids == reference.token_ids
        else:
            assert_same_greedy(ours, reference)
    for ours, reference in zip(_default_model_outputs(), quantized):
        assert_same_greedy(ours, reference)
