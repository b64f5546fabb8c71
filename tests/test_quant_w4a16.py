"""The W4A16 methods (AWQ, GPTQ, compressed-tensors pack-quantized) from checkpoint tensors written
by reference packers here, which follow what AutoAWQ, AutoGPTQ and compressed-tensors write:
round-to-nearest quantization of random weights, packed in each layout. Each method's
repack must decode to exactly the reference dequantization W, and apply must give x @ W^T: on
the CPU through torch's int4 kernel (in bfloat16's tolerance) where the layer fits it, else exactly
through the torch reference (act-order, group sizes and widths the kernel refuses); the loader's
slicing attributes, applied as the quantization contract describes, must reassemble fused parts
and tensor-parallel shards. (The Triton kernel and the CUDA paths have their own tests.)"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch import nn

from pagoda.kernels.w4a16_layout import dequantize
from pagoda.layers.linear import Shard, UnquantizedLinearMethod
from pagoda.quantization import QUANTIZATION_METHODS, get_quantization_config
from pagoda.quantization.awq import AWQConfig, AWQLinearMethod
from pagoda.quantization.gptq import GPTQConfig, GPTQLinearMethod
from pagoda.quantization.w4a16 import compressed_tensors_w4a16_method
from tests.test_int4pack import assert_bf16_close

GROUPS = [32, 64, 128, -1]  # -1: per output channel


@dataclass
class Quantized:
    """RTN 4-bit quantization of W [N, K]: W ~ (q - zero[g]) * scale[g] per input row's group g."""

    q: torch.Tensor  # [N, K] values 0..15
    scales: torch.Tensor  # [groups, N]
    zeros: torch.Tensor  # [groups, N] values 0..15
    g_idx: torch.Tensor  # [K] group of each input row

    def dequantized(self) -> torch.Tensor:
        g = self.g_idx.long()
        return ((self.q.t() - self.zeros[g]) * self.scales[g]).t()


def quantize(w: torch.Tensor, group_size: int, sym: bool, act_order: bool = False, seed: int = 0) -> Quantized:
    n, k = w.shape
    group_size = k if group_size == -1 else group_size
    g_idx = torch.arange(k) // group_size
    if act_order:  # GPTQ's act-order: groups of consecutive rows in a permuted order
        perm = torch.randperm(k, generator=torch.Generator().manual_seed(seed))
        g_idx = torch.empty(k, dtype=torch.long)
        g_idx[perm] = torch.arange(k) // group_size
    groups = k // group_size
    scales, zeros = torch.empty(groups, n), torch.empty(groups, n)
    for grp in range(groups):
        rows = w[:, g_idx == grp]
        if sym:  # AutoGPTQ's symmetric: zero 8, scale from the largest magnitude
            scales[grp] = 2 * rows.abs().amax(dim=1) / 15
            zeros[grp] = 8
        else:
            lo, hi = rows.amin(dim=1).clamp(max=0), rows.amax(dim=1).clamp(min=0)
            scales[grp] = (hi - lo) / 15
            # Zeros kept in 1..15: AutoGPTQ v1 stores zero - 1, and a stored -1 would spill into
            # the neighbouring nibbles (its known overflow), which no real packer output relies on.
            zeros[grp] = torch.round(-lo / scales[grp]).clamp(1, 15)
    q = torch.clamp(torch.round(w / scales[g_idx].t()) + zeros[g_idx].t(), 0, 15)
    return Quantized(q.long(), scales, zeros, g_idx.int())


def pack_words(values: torch.Tensor, order: tuple[int, ...] = tuple(range(8))) -> torch.Tensor:
    """Pack the last dim 8 values per int32, nibble i holding value order[i] of each 8 (as the
    AutoAWQ / AutoGPTQ packers loop: word |= value << 4 * i)."""
    v = values.long().reshape(*values.shape[:-1], -1, 8)
    word = torch.zeros(v.shape[:-1], dtype=torch.long)
    for i, src in enumerate(order):
        word |= (v[..., src] & 0xF) << (4 * i)
    return torch.where(word >= 2**31, word - 2**32, word).to(torch.int32)


def awq_tensors(qz: Quantized) -> dict[str, torch.Tensor]:
    """AutoAWQ's WQLinear_GEMM.from_linear: qweight [K, N/8] and qzeros [groups, N/8] in its
    interleaved column order, scales [groups, N]."""
    order = (0, 2, 4, 6, 1, 3, 5, 7)
    return {"qweight": pack_words(qz.q.t(), order), "qzeros": pack_words(qz.zeros, order), "scales": qz.scales}


def gptq_tensors(qz: Quantized, zero_offset: int = 1) -> dict[str, torch.Tensor]:
    """AutoGPTQ's QuantLinear.pack: qweight [K/8, N] (8 consecutive input rows per word), qzeros
    [groups, N/8] holding zero - 1 (checkpoint_format gptq), scales [groups, N], g_idx [K]."""
    return {"qweight": pack_words(qz.q).t().contiguous(), "qzeros": pack_words(qz.zeros - zero_offset), "scales": qz.scales, "g_idx": qz.g_idx}


def ct_tensors(qz: Quantized, sym: bool) -> dict[str, torch.Tensor]:
    """compressed-tensors pack-quantized: signed values (q - 8) stored + 8, weight_packed [N, K/8]
    packed along K, weight_scale [N, groups], weight_zero_point [N/8, groups] packed along N."""
    out = {"weight_packed": pack_words(qz.q), "weight_scale": qz.scales.t().contiguous(),
           "weight_shape": torch.tensor(list(qz.q.shape))}
    if not sym:
        out["weight_zero_point"] = pack_words(qz.zeros).t().contiguous()
    return out


# format -> (method for group_size, tensors from a Quantized, symmetric, act-order)
FORMATS = {
    "awq": (lambda g: _awq(g), awq_tensors, False, False),
    "gptq-sym": (lambda g: _gptq(g, sym=True), gptq_tensors, True, False),
    "gptq-asym": (lambda g: _gptq(g, sym=False), gptq_tensors, False, False),
    "gptq-act-order": (lambda g: _gptq(g, sym=False, desc_act=True), gptq_tensors, False, True),
    "gptq-v2": (lambda g: _gptq(g, sym=False, checkpoint_format="gptq_v2"),
                lambda qz: gptq_tensors(qz, zero_offset=0), False, False),
    "ct-sym": (lambda g: _ct(g, True), lambda qz: ct_tensors(qz, True), True, False),
    "ct-asym": (lambda g: _ct(g, False), lambda qz: ct_tensors(qz, False), False, False),
}
PREFIX = "model.layers.0.self_attn.qkv_proj"


def _awq(group_size: int):
    config = {"quant_method": "awq", "w_bit": 4, "q_group_size": group_size, "zero_point": True, "version": "GEMM"}
    return AWQConfig.from_config(config).linear_method(PREFIX)


def _gptq(group_size: int, **fields):
    return GPTQConfig.from_config({"quant_method": "gptq", "bits": 4, "group_size": group_size, **fields}).linear_method(PREFIX)


def _ct(group_size: int, sym: bool):
    strategy = {"strategy": "channel"} if group_size == -1 else {"strategy": "group", "group_size": group_size}
    return compressed_tensors_w4a16_method({"weights": {"num_bits": 4, "type": "int", "symmetric": sym, **strategy}})


def contract_load(layer: nn.Module, tensors: dict[str, torch.Tensor], out_offset: int = 0, shard: Shard | None = None):
    """Load whole checkpoint tensors as the contract's layer loader does: this rank's input
    shard along input_dim, the part's rows at `out_offset` along output_dim (both in features,
    divided by the parameter's divisors); parameters with neither attribute copied whole."""
    for name, tensor in tensors.items():
        param = getattr(layer, name)
        if shard is not None and hasattr(param, "input_dim"):
            div = getattr(param, "input_divisor", 1)
            tensor = tensor.narrow(param.input_dim, shard.start // div, shard.size // div)
        if hasattr(param, "output_dim"):
            div = getattr(param, "output_divisor", 1)
            param.data.narrow(param.output_dim, out_offset // div, tensor.shape[param.output_dim]).copy_(tensor)
        else:
            param.data.copy_(tensor)


def build(method, input_size: int, output_size: int, shard: Shard | None = None) -> nn.Module:
    layer = nn.Module()
    if shard is not None:
        layer.input_shard = shard  # as RowParallelLinear sets it before create_weights
    method.create_weights(layer, input_size, output_size)
    return layer


def random_weight(n: int, k: int, seed: int) -> torch.Tensor:
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) / 8


def assert_applies(layer: nn.Module, got: torch.Tensor, exact: torch.Tensor) -> None:
    """The int4 kernel's product within bfloat16's tolerance; the reference's exactly (fp32 sums)."""
    if layer.int4 is not None:
        assert_bf16_close(got, exact)
    else:
        torch.testing.assert_close(got, exact, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("group_size", GROUPS)
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_method_dequantizes_as_the_reference_and_applies_it(fmt, group_size):
    make_method, tensors_of, sym, act_order = FORMATS[fmt]
    n, k = 48, 256
    qz = quantize(random_weight(n, k, group_size), group_size, sym, act_order, seed=group_size)
    method = make_method(group_size)
    layer = build(method, k, n)
    contract_load(layer, tensors_of(qz))
    packed = method.repack(layer)
    w = dequantize(packed.qweight, packed.scales, packed.zeros, packed.g_idx, packed.group_size)
    torch.testing.assert_close(w.t(), qz.dequantized(), rtol=0, atol=0)

    method.process_weights_after_loading(layer)
    # Every layer here fits the CPU's int4 kernel (per-channel in groups of 256) but act-order's,
    # and the kernel's layer holds no other copy.
    assert (layer.int4 is None) is act_order
    assert (layer.w4_qweight is None) is not act_order
    x = torch.randn(2, 3, k)
    bias = torch.randn(n)
    assert_applies(layer, method.apply(layer, x, bias), x @ qz.dequantized().t() + bias)
    assert not hasattr(layer, "qweight") and not hasattr(layer, "weight_packed")  # the checkpoint copies freed


@pytest.mark.parametrize("fmt,n,k,group_size", [
    ("awq", 48, 256, 16),  # groups below the kernel's 32
    ("gptq-sym", 24, 256, 32),  # outputs not a multiple of 16
    ("ct-asym", 48, 40, -1),  # per-channel over inputs not a multiple of 32
])
def test_layers_the_int4_kernel_refuses_run_the_exact_reference(fmt, n, k, group_size):
    make_method, tensors_of, sym, act_order = FORMATS[fmt]
    qz = quantize(random_weight(n, k, 3), group_size, sym, act_order)
    method = make_method(group_size)
    layer = build(method, k, n)
    contract_load(layer, tensors_of(qz))
    method.process_weights_after_loading(layer)
    assert layer.int4 is None
    x = torch.randn(4, k)
    torch.testing.assert_close(method.apply(layer, x, None), x @ qz.dequantized().t(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_fused_parts_load_side_by_side(fmt):
    """q|k|v-style: parts quantized apart, loaded at their output offsets, one matmul. (Parts
    that share an input share GPTQ's act-order permutation: it sorts that input's Hessian.)"""
    make_method, tensors_of, sym, act_order = FORMATS[fmt]
    k, sizes = 128, [64, 32, 32]
    parts = [quantize(random_weight(size, k, i), 32, sym, act_order, seed=0) for i, size in enumerate(sizes)]
    method = make_method(32)
    layer = build(method, k, sum(sizes))
    offset = 0
    for qz, size in zip(parts, sizes):
        contract_load(layer, tensors_of(qz), out_offset=offset)
        offset += size
    method.process_weights_after_loading(layer)
    x = torch.randn(5, k)
    whole = torch.cat([qz.dequantized() for qz in parts])
    assert_applies(layer, method.apply(layer, x, None), x @ whole.t())


@pytest.mark.parametrize("group_size", [32, -1])
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_row_parallel_shards_sum_to_the_whole(fmt, group_size):
    """Two TP ranks each load their input shard (act-order ranks keep every group's scales)."""
    make_method, tensors_of, sym, act_order = FORMATS[fmt]
    n, k, ranks = 32, 256, 2
    qz = quantize(random_weight(n, k, 7), group_size, sym, act_order, seed=7)
    x = torch.randn(3, k)
    total = torch.zeros(3, n)
    for rank in range(ranks):
        shard = Shard(rank * k // ranks, k // ranks, k)
        method = make_method(group_size)
        layer = build(method, shard.size, n, shard)
        contract_load(layer, tensors_of(qz), shard=shard)
        method.process_weights_after_loading(layer)
        total += method.apply(layer, x[:, shard.start : shard.start + shard.size], None)
    assert_applies(layer, total, x @ qz.dequantized().t())


def test_bf16_apply_keeps_the_activation_dtype():
    qz = quantize(random_weight(16, 64, 0), 32, sym=False)
    method = AWQLinearMethod(32)
    torch.set_default_dtype(torch.bfloat16)  # as the model builder does for a bf16 model
    try:
        layer = build(method, 64, 16)
    finally:
        torch.set_default_dtype(torch.float32)
    contract_load(layer, awq_tensors(qz))
    method.process_weights_after_loading(layer)
    x = torch.randn(2, 64, dtype=torch.bfloat16)
    out = method.apply(layer, x, None)
    assert out.dtype == torch.bfloat16
    assert_bf16_close(out.float(), x.float() @ qz.dequantized().t())


def test_registry_and_configs_from_checkpoint_fields():
    assert QUANTIZATION_METHODS["awq"] is AWQConfig and QUANTIZATION_METHODS["gptq"] is GPTQConfig
    awq = get_quantization_config(
        "awq", {"quant_method": "awq", "w_bit": 4, "q_group_size": 64, "zero_point": True, "version": "GEMM",
                "modules_to_not_convert": ["visual"]},
    )
    assert isinstance(awq.linear_method("model.layers.0.mlp.gate_up_proj"), AWQLinearMethod)
    assert awq.linear_method("model.layers.0.mlp.gate_up_proj").group_size == 64
    assert isinstance(awq.linear_method("visual.blocks.0.qkv"), UnquantizedLinearMethod)
    gptq = get_quantization_config(
        "gptq", {"bits": 4, "group_size": 128, "desc_act": True, "sym": False, "checkpoint_format": "gptq_v2"},
    )
    method = gptq.linear_method("model.layers.0.self_attn.o_proj")
    assert (method.group_size, method.desc_act, method.sym, method.zero_offset) == (128, True, False, 0)


@pytest.mark.parametrize("name,config,field", [
    ("gptq", {"bits": 8, "group_size": 128}, "bits"),
    ("gptq", {"bits": 3, "group_size": 128}, "bits"),
    ("gptq", {"bits": 4, "group_size": 128, "checkpoint_format": "marlin"}, "checkpoint_format"),
    ("awq", {"bits": 8, "group_size": 128}, "bits"),
    ("awq", {"w_bit": 4, "q_group_size": 128, "version": "gemv"}, "version"),
    ("awq", {"w_bit": 4, "q_group_size": 128, "zero_point": False}, "zero_point"),
    ("int3", {}, "quantization='int3'"),
])
def test_unsupported_checkpoints_are_refused_naming_the_field(name, config, field):
    with pytest.raises(ValueError, match=field):
        get_quantization_config(name, config)


def test_group_size_that_does_not_divide_the_layer_is_refused():
    with pytest.raises(ValueError, match="group_size=128"):
        build(GPTQLinearMethod(128, False, True, 1), 192, 16)


@pytest.mark.parametrize("weights,field", [
    ({"num_bits": 8, "strategy": "channel"}, "num_bits"),
    ({"num_bits": 4, "strategy": "tensor"}, "strategy"),
    ({"num_bits": 4, "strategy": "group", "group_size": 128, "actorder": "group"}, "actorder"),
    ({"num_bits": 4, "type": "float", "strategy": "channel"}, "type"),
])
def test_compressed_tensors_schemes_outside_w4a16_are_refused(weights, field):
    with pytest.raises(ValueError, match=field):
        compressed_tensors_w4a16_method({"weights": weights})
