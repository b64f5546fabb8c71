"""compressed-tensors checkpoints (quant_method "compressed-tensors"), written in its float-quantized
and int-quantized layouts by the compressed-tensors library (tests/quant_packing.py): W8A8 FP8 (channel or tensor
weight scales, dynamic or static activations) and W8A8 INT8 load the reference's dequantized
weights and give its greedy tokens in fp32 on the CPU; `ignore` is honoured; schemes Pagoda does
not run are refused naming the field. The `gpu` tests check torch._int_mm's path against torch."""

from __future__ import annotations

import pytest
import torch

from pagoda import LLM
from pagoda.layers.linear import ColumnParallelLinear, Linear
from pagoda.quantization.fp8 import FP8, dequantize_rows
from pagoda.quantization.int8 import Int8LinearMethod, quantize_int8_rows
from tests.quant_packing import ct_config, ct_packer, pack_checkpoint
from tests.test_quant_fp8 import built_models, greedy, prompts  # noqa: F401  (fixtures)
from tests.tiny_models import save_tiny_model

FP8_WEIGHTS = {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": False}
FP8_TOKENS = {"num_bits": 8, "type": "float", "strategy": "token", "symmetric": True, "dynamic": True}
FP8_STATIC = {"num_bits": 8, "type": "float", "strategy": "tensor", "symmetric": True, "dynamic": False}
INT8_WEIGHTS = {"num_bits": 8, "type": "int", "symmetric": True, "dynamic": False}
INT8_TOKENS = {"num_bits": 8, "type": "int", "strategy": "token", "symmetric": True, "dynamic": True}


SCHEMES = {
    "fp8-channel-dynamic": ({**FP8_WEIGHTS, "strategy": "channel"}, FP8_TOKENS, "float-quantized"),
    "fp8-tensor-static": ({**FP8_WEIGHTS, "strategy": "tensor"}, FP8_STATIC, "float-quantized"),
    "int8-channel": ({**INT8_WEIGHTS, "strategy": "channel"}, INT8_TOKENS, "int-quantized"),
    "int8-tensor": ({**INT8_WEIGHTS, "strategy": "tensor"}, INT8_TOKENS, "int-quantized"),
}


def int8_channel():
    return ct_packer({**INT8_WEIGHTS, "strategy": "channel"}, INT8_TOKENS)


def loaded_dequantized(model) -> dict[str, torch.Tensor]:
    out = {}
    for name, layer in model.named_modules():
        if not isinstance(layer, Linear) or layer.weight.dtype not in (FP8, torch.int8):
            continue
        weight = dequantize_rows(layer.weight, layer.weight_scale, torch.float32)
        if isinstance(layer, ColumnParallelLinear):
            parent = name.rpartition(".")[0]
            rows = weight.split([s.size for s in layer.parts.values()])
            out.update({f"{parent}.{part}.weight": w for part, w in zip(layer.parts, rows)})
        else:
            out[f"{name}.weight"] = weight
    return out


@pytest.mark.parametrize("arch", ["llama3", "qwen2-mqa"])
@pytest.mark.parametrize("scheme", sorted(SCHEMES))
def test_scheme_loads_the_reference_weights_and_gives_its_greedy_tokens(
    scheme, arch, prompts, tmp_path, built_models  # noqa: F811
):
    weights, acts, fmt = SCHEMES[scheme]
    pack = ct_packer(weights, acts, input_scale=not acts["dynamic"])
    config = ct_config(weights, acts, fmt)
    src = save_tiny_model(arch, tmp_path)
    ref, dequantized = pack_checkpoint(src, tmp_path / "ct", pack, config)
    assert greedy(tmp_path / "ct", prompts) == greedy(ref, prompts)
    loaded = loaded_dequantized(built_models[0])
    assert sorted(loaded) == sorted(dequantized)
    for name, weight in dequantized.items():
        torch.testing.assert_close(loaded[name], weight, rtol=0, atol=0, msg=name)


def test_ignored_layers_stay_unquantized(prompts, tmp_path, built_models):  # noqa: F811
    config = ct_config({**INT8_WEIGHTS, "strategy": "channel"}, INT8_TOKENS, "int-quantized",
                       ignore=["re:.*down_proj$"])
    src = save_tiny_model("llama3", tmp_path)
    ref, _ = pack_checkpoint(src, tmp_path / "ct", int8_channel(), config, skip=("down_proj",))
    assert greedy(tmp_path / "ct", prompts) == greedy(ref, prompts)
    layer = built_models[0].model.layers[1]
    assert layer.mlp.down_proj.weight.dtype == torch.float32
    assert layer.mlp.gate_up_proj.weight.dtype == torch.int8


def test_int8_channel_scales_are_sharded_at_tp2(prompts, tmp_path):  # noqa: F811
    weights, acts, fmt = SCHEMES["int8-channel"]
    src = save_tiny_model("qwen2-mqa", tmp_path)
    pack_checkpoint(src, tmp_path / "ct", int8_channel(), ct_config(weights, acts, fmt))
    assert greedy(tmp_path / "ct", prompts, tensor_parallel_size=2) == greedy(tmp_path / "ct", prompts)


def _refusal(tmp_path, config, arch="llama3") -> str:
    src = save_tiny_model(arch, tmp_path)
    pack_checkpoint(src, tmp_path / "ct", int8_channel(), config)
    with pytest.raises(ValueError) as error:
        LLM(model=str(tmp_path / "ct"), device="cpu", skip_tokenizer_init=True)
    return str(error.value)


def test_part_of_a_packed_layer_ignored_is_refused(tmp_path):
    config = ct_config({**INT8_WEIGHTS, "strategy": "channel"}, INT8_TOKENS, "int-quantized", ignore=["q_proj"])
    assert "quantization_config.ignore names only part of the packed layer" in _refusal(tmp_path, config)


def test_static_int8_activations_are_refused(tmp_path):
    static = {**INT8_TOKENS, "dynamic": False, "strategy": "tensor"}
    message = _refusal(tmp_path, ct_config({**INT8_WEIGHTS, "strategy": "channel"}, static, "int-quantized"))
    assert "config_groups.group_0.input_activations" in message and "dynamic per-token" in message


def test_asymmetric_int8_weights_are_refused(tmp_path):
    weights = {**INT8_WEIGHTS, "strategy": "channel", "symmetric": False}
    message = _refusal(tmp_path, ct_config(weights, INT8_TOKENS, "int-quantized"))
    assert "config_groups.group_0.weights.symmetric" in message

def test_quantized_moe_experts_are_refused(tmp_path):
    config = ct_config({**INT8_WEIGHTS, "strategy": "channel"}, INT8_TOKENS, "int-quantized")
    message = _refusal(tmp_path, config, arch="qwen2-moe")
    assert "MoE experts" in message


# The GPU path: torch._int_mm -------------------------------------------------------------------------

SHAPES_8B = [(4096, 6144), (4096, 4096), (4096, 28672), (14336, 4096)]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("m", [1, 16, 17, 64, 512])
@pytest.mark.parametrize("k,n", SHAPES_8B)
def test_int_mm_path_equals_the_torch_reference(k, n, m):
    torch.manual_seed(0)
    weight = torch.randint(-127, 128, (n, k), dtype=torch.int8, device="cuda")
    scale = torch.rand(n, 1, device="cuda") / 1000 + 1e-4
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    method = Int8LinearMethod(channel_scales=True)
    with torch.device("cuda"):
        layer = Linear(k, n, linear_method=method)
    layer.weight.data.copy_(weight)
    layer.weight_scale.data.copy_(scale)
    method.process_weights_after_loading(layer)
    assert layer.int8_gemm
    got = method.apply(layer, x, None)
    qx, x_scale = quantize_int8_rows(x)
    # int32 products are exact in float64 at these sizes.
    expected = (qx.double() @ weight.double().t()) * x_scale.double() * scale.double().t()
    assert got.dtype == torch.bfloat16 and got.shape == (m, n)
    torch.testing.assert_close(got.double(), expected, rtol=1e-2, atol=1e-2 * expected.abs().mean().item())
