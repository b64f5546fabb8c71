"""The quantization seam: the linear layers' loaders slice a whole checkpoint tensor by the
attributes a method sets on its parameters (output_dim/output_divisor, input_dim/input_divisor,
per_part), here for a packed layout at TP rank 1 of 2; and `--quantization` is resolved against
the checkpoint's quantization_config, refusing what cannot run with a message naming the flag or
the field."""

from __future__ import annotations

import argparse

import pytest
import torch
from torch import nn

from pagoda import LLM
from pagoda.distributed.parallel_state import GroupInfo
from pagoda.entrypoints.engine_args import add_engine_arguments, engine_kwargs
from pagoda.layers import linear as linear_module
from pagoda.layers.linear import (
    ColumnParallelLinear,
    LinearMethod,
    RowParallelLinear,
    Shard,
    sliced_param,
)
from tests.quant_packing import fp8_per_tensor, pack_checkpoint
from tests.tiny_models import save_tiny_model

PACK, GROUP = 8, 4  # output features per packed word; input features per scale group


class PackedMethod(LinearMethod):
    """Test-only, AWQ-like: `qweight` [in, out / 8] (8 outputs a word), `scales` [in / group, out],
    and one per-tensor `part_scale` per part."""

    def create_weights(self, layer: nn.Module, input_size: int, output_size: int) -> None:
        layer.qweight = sliced_param(torch.empty(input_size, output_size // PACK), output_dim=1, output_divisor=PACK,
                                     input_dim=0)
        layer.scales = sliced_param(torch.empty(input_size // GROUP, output_size), output_dim=1, input_dim=0,
                                    input_divisor=GROUP)
        layer.part_scale = sliced_param(torch.empty(len(layer.part_sizes)), per_part=True)

    def apply(self, layer, x, bias):
        raise NotImplementedError


@pytest.fixture
def rank1_of_2(monkeypatch):
    monkeypatch.setattr(linear_module, "tp_group", lambda: GroupInfo(1, 2))


def test_column_parallel_loader_slices_each_part_by_output_dim_and_divisor(rank1_of_2):
    q, k = Shard(16, 16, 32), Shard(8, 8, 16)  # rank 1's half of each part
    layer = ColumnParallelLinear(8, {"q_proj": q, "k_proj": k}, linear_method=PackedMethod())
    whole = {p: torch.arange(8 * s.full // PACK, dtype=torch.float32).reshape(8, -1) + 1000 * i
             for i, (p, s) in enumerate({"q_proj": q, "k_proj": k}.items())}
    for part, tensor in whole.items():
        layer.load_weight("qweight", tensor, part)
        layer.load_weight("part_scale", torch.tensor(0.5 + len(part)), part)
        layer.load_weight("scales", torch.full((2, tensor.shape[1] * PACK), float(len(part))), part)
    # q's words 2..3 of 4 (its outputs 16..31), then k's word 1 of 2 (its outputs 8..15).
    expected = torch.cat([whole["q_proj"][:, 2:4], whole["k_proj"][:, 1:2]], dim=1)
    assert torch.equal(layer.qweight, expected)
    assert layer.scales.shape == (2, 24)
    assert layer.part_scale.tolist() == [6.5, 6.5]


def test_a_fused_tensor_fills_every_part_and_its_one_scale_serves_all(rank1_of_2):
    q, k = Shard(16, 16, 32), Shard(8, 8, 16)
    layer = ColumnParallelLinear(8, {"q_proj": q, "k_proj": k}, linear_method=PackedMethod())
    fused = torch.arange(8 * 6, dtype=torch.float32).reshape(8, 6)  # 4 q words | 2 k words
    layer.load_weight("qweight", fused, None)
    layer.load_weight("part_scale", torch.tensor([3.0]), None)
    assert torch.equal(layer.qweight, fused[:, [2, 3, 5]])
    assert layer.part_scale.tolist() == [3.0, 3.0]


def test_row_parallel_loader_slices_by_input_dim_and_divisor(rank1_of_2):
    layer = RowParallelLinear(16, 16, linear_method=PackedMethod())
    qweight = torch.arange(16 * 2, dtype=torch.float32).reshape(16, 2)
    scales = torch.arange(4 * 16, dtype=torch.float32).reshape(4, 16)
    layer.load_weight("qweight", qweight)
    layer.load_weight("scales", scales)
    layer.load_weight("part_scale", torch.tensor(2.0))
    assert torch.equal(layer.qweight, qweight[8:])  # input rows 8..15
    assert torch.equal(layer.scales, scales[2:])  # their groups 2..3
    assert layer.part_scale.tolist() == [2.0]


def test_a_checkpoint_tensor_of_the_wrong_size_is_refused(rank1_of_2):
    layer = ColumnParallelLinear(8, {"q_proj": Shard(16, 16, 32)}, linear_method=PackedMethod())
    with pytest.raises(ValueError, match=r"q_proj\.qweight has 3 rows, expected 4"):
        layer.load_weight("qweight", torch.zeros(8, 3), "q_proj")


# --quantization against the checkpoint ------------------------------------------------------------


@pytest.fixture(scope="module")
def fp8_checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    src = save_tiny_model("llama3", root)
    pack_checkpoint(src, root / "fp8", fp8_per_tensor, {"quant_method": "fp8", "activation_scheme": "dynamic"})
    return root / "fp8"


def _refused(path, **engine) -> str:
    with pytest.raises(ValueError) as error:
        LLM(model=str(path), device="cpu", skip_tokenizer_init=True, **engine)
    return str(error.value)


def test_an_unknown_method_is_refused_naming_the_flag_and_the_supported(fp8_checkpoint):
    message = _refused(fp8_checkpoint.with_name("llama3"), quantization="bogus")
    assert "quantization='bogus' is not supported" in message and "'fp8'" in message


def test_a_flag_that_contradicts_the_checkpoint_is_refused(fp8_checkpoint):
    message = _refused(fp8_checkpoint, quantization="compressed-tensors")
    assert "contradicts" in message and "quantization_config.quant_method is 'fp8'" in message


@pytest.mark.parametrize("method", ["awq", "gptq", "compressed-tensors"])
def test_a_method_for_quantized_checkpoints_on_an_unquantized_one_says_so(fp8_checkpoint, method):
    """Not as a field its quantization_config lacks (the AWQ method said "has none of w_bit, bits")."""
    message = _refused(fp8_checkpoint.with_name("llama3"), quantization=method)
    assert message.startswith(f"quantization={method!r} runs {method} checkpoints, and this model's config has no "
                              "quantization_config")


def test_a_checkpoint_method_pagoda_lacks_is_refused_naming_the_field(tmp_path):
    src = save_tiny_model("llama3", tmp_path)
    pack_checkpoint(src, tmp_path / "bnb", fp8_per_tensor, {"quant_method": "bitsandbytes"})
    assert "quantization_config.quant_method='bitsandbytes' is not supported" in _refused(tmp_path / "bnb")


def test_the_transformers_fallback_refuses_quantization(fp8_checkpoint):
    message = _refused(fp8_checkpoint.with_name("llama3"), quantization="fp8", model_impl="transformers")
    assert "quantization='fp8'" in message and "transformers fallback" in message


def test_quantization_flag_and_its_alias_reach_the_engine_config():
    parser = argparse.ArgumentParser()
    add_engine_arguments(parser)
    assert engine_kwargs(parser.parse_args(["--quantization", "fp8"]))["quantization"] == "fp8"
    assert engine_kwargs(parser.parse_args(["-q", "compressed-tensors"]))["quantization"] == "compressed-tensors"
    assert engine_kwargs(parser.parse_args([]))["quantization"] is None
