"""FP8 weights (--quantization fp8): an fp32 checkpoint quantized at load (per-channel scales) and
Hugging Face fp8 checkpoints (per-tensor scales, dynamic or static activations), written by the
reference packer in tests/quant_packing.py. On the CPU the fp8 weights are dequantized for the
matmul, so the model must load exactly the reference's dequantized weights and give the greedy
tokens of that reference in fp32. The `gpu` tests check torch._scaled_mm's path against a torch
reference on the 8B model's shapes."""

from __future__ import annotations

import random

import pytest
import torch
import transformers
from safetensors.torch import load_file

from pagoda import LLM, SamplingParams
from pagoda.config.resolve import model_spec
from pagoda.layers.linear import ColumnParallelLinear, Linear
from pagoda.loader.model_loader import build_model
from pagoda.parallel_config import estimate_weight_bytes
from pagoda.quantization.fp8 import FP8, Fp8Config, Fp8LinearMethod, dequantize_rows
from pagoda.worker import model_runner
from tests.quant_packing import (
    fp8_dequantized_per_channel,
    fp8_per_channel,
    fp8_per_tensor,
    pack_checkpoint,
)
from tests.tiny_models import save_tiny_model

HF_FP8 = {"quant_method": "fp8", "activation_scheme": "dynamic"}
HF_FP8_STATIC = {"quant_method": "fp8", "activation_scheme": "static"}
ARCHS = ["llama3", "qwen2-mqa"]  # GQA untied, and MQA with q/k/v biases


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    rng = random.Random(5)
    return [[rng.randrange(2, 256) for _ in range(n)] for n in (5, 23, 11)]


def greedy(path, prompts, **engine) -> list[list[int]]:
    llm = LLM(model=str(path), device="cpu", skip_tokenizer_init=True, max_num_batched_tokens=16, block_size=4,
              **engine)
    try:
        params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
        outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    finally:
        llm.shutdown()
    return [o.outputs[0].token_ids for o in outputs]


@pytest.fixture
def built_models(monkeypatch) -> list:
    """The models the engine builds in this process, for their loaded weights."""
    built = []

    def capture(*args, **kwargs):
        built.append(build_model(*args, **kwargs))
        return built[-1]

    monkeypatch.setattr(model_runner, "build_model", capture)
    return built


def loaded_dequantized(model) -> dict[str, torch.Tensor]:
    """Each quantized projection's weight as the model holds it, dequantized, by checkpoint name."""
    out = {}
    for name, layer in model.named_modules():
        if not isinstance(layer, Linear) or layer.weight.dtype != FP8:
            continue
        weight = dequantize_rows(layer.weight, layer.weight_scale, torch.float32)
        if isinstance(layer, ColumnParallelLinear):
            rows = weight.split([s.size for s in layer.parts.values()])
            parent = name.rpartition(".")[0]
            out.update({f"{parent}.{part}.weight": w for part, w in zip(layer.parts, rows)})
        else:
            out[f"{name}.weight"] = weight
    return out


def assert_weights_equal(model, reference: dict[str, torch.Tensor]) -> None:
    loaded = loaded_dequantized(model)
    assert sorted(loaded) == sorted(reference)
    for name, weight in reference.items():
        torch.testing.assert_close(loaded[name], weight, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("arch", ARCHS)
def test_fp8_checkpoint_loads_the_reference_weights_and_gives_its_greedy_tokens(arch, prompts, tmp_path, built_models):
    src = save_tiny_model(arch, tmp_path)
    ref, dequantized = pack_checkpoint(src, tmp_path / "fp8", fp8_per_tensor, HF_FP8)
    expected = greedy(ref, prompts)
    assert greedy(tmp_path / "fp8", prompts) == expected  # quantization read from the checkpoint
    assert_weights_equal(built_models[-1], dequantized)


@pytest.mark.parametrize("arch", ARCHS)
def test_dynamic_fp8_quantizes_each_output_channel_at_load(arch, prompts, tmp_path, built_models):
    src = save_tiny_model(arch, tmp_path)
    ref, dequantized = pack_checkpoint(src, tmp_path / "unused", fp8_per_channel, {})
    assert greedy(src, prompts, quantization="fp8") == greedy(ref, prompts)
    assert_weights_equal(built_models[0], {n: fp8_dequantized_per_channel(w) for n, w in dequantized.items()})


def test_static_activation_scales_are_loaded_and_folded_to_the_largest(prompts, tmp_path, built_models):
    src = save_tiny_model("llama3", tmp_path)
    ref, _ = pack_checkpoint(src, tmp_path / "fp8", lambda w: fp8_per_tensor(w, input_scale=float(w.abs().max()) / 100),
                             HF_FP8_STATIC)
    assert greedy(tmp_path / "fp8", prompts) == greedy(ref, prompts)
    qkv = built_models[0].model.layers[0].self_attn.qkv_proj
    tensors = load_file(tmp_path / "fp8" / "model.safetensors")
    scales = [tensors[f"model.layers.0.self_attn.{p}_proj.input_scale"] for p in "qkv"]
    assert qkv.input_scale.item() == max(s.item() for s in scales)


def test_ignored_layers_stay_unquantized(prompts, tmp_path, built_models):
    src = save_tiny_model("llama3", tmp_path)
    config = {**HF_FP8, "ignored_layers": ["down_proj"]}
    ref, dequantized = pack_checkpoint(src, tmp_path / "fp8", fp8_per_tensor, config, skip=("down_proj",))
    assert greedy(tmp_path / "fp8", prompts) == greedy(ref, prompts)
    model = built_models[0]
    assert model.model.layers[0].mlp.down_proj.weight.dtype == torch.float32
    assert_weights_equal(model, dequantized)


def test_fp8_at_tp2_gives_the_tokens_of_one_process(prompts, tmp_path):
    src = save_tiny_model("qwen2-mqa", tmp_path)
    pack_checkpoint(src, tmp_path / "fp8", fp8_per_tensor, HF_FP8)
    assert greedy(tmp_path / "fp8", prompts, tensor_parallel_size=2) == greedy(tmp_path / "fp8", prompts)


def test_block_wise_fp8_is_refused_naming_the_field(tmp_path):
    src = save_tiny_model("llama3", tmp_path)
    pack_checkpoint(src, tmp_path / "fp8", fp8_per_tensor, {**HF_FP8, "weight_block_size": [128, 128]})
    with pytest.raises(ValueError, match=r"quantization_config\.weight_block_size=\[128, 128\].*not supported"):
        LLM(model=str(tmp_path / "fp8"), device="cpu", skip_tokenizer_init=True)


def test_quantized_weight_bytes_count_one_byte_per_projection_weight():
    spec = model_spec(transformers.LlamaConfig(
        hidden_size=4096, num_attention_heads=32, num_key_value_heads=8, intermediate_size=14336,
        num_hidden_layers=32, vocab_size=128256, tie_word_embeddings=False,
    ))
    projections = 32 * (4096 * (4096 + 2 * 1024) + 4096 * 4096 + 3 * 4096 * 14336)
    bf16 = estimate_weight_bytes(spec, torch.bfloat16)
    assert estimate_weight_bytes(spec, torch.bfloat16, Fp8Config.from_config({})) == bf16 - projections


# The GPU path: torch._scaled_mm --------------------------------------------------------------------

needs_fp8 = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9), reason="needs an FP8 GPU"
)
# The 8B model's projections (K, N): qkv, o, gate|up, down.
SHAPES_8B = [(4096, 6144), (4096, 4096), (4096, 28672), (14336, 4096)]


def _fp8_layer(k: int, n: int, method: Fp8LinearMethod, weight: torch.Tensor) -> Linear:
    with torch.device("cuda"):
        layer = Linear(k, n, linear_method=method)
    layer.weight.data = weight
    method.process_weights_after_loading(layer)
    return layer


@pytest.mark.gpu
@needs_fp8
@pytest.mark.parametrize("m", [1, 16, 64, 256, 512])  # 256: down_proj takes the Triton GEMM
@pytest.mark.parametrize("k,n", SHAPES_8B)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_scaled_mm_path_equals_the_torch_reference(k, n, m, dtype):
    torch.manual_seed(0)
    weight = torch.randn(n, k, device="cuda", dtype=dtype) / k**0.5
    x = torch.randn(m, k, device="cuda", dtype=dtype)
    method = Fp8LinearMethod(serialized=False)
    layer = _fp8_layer(k, n, method, weight)
    assert layer.fp8_gemm and layer.weight.dtype == FP8
    got = method.apply(layer, x, None)
    # Reference: the same per-token and per-channel quantization, the product in float32.
    x_scale = x.abs().amax(-1, keepdim=True).float() / torch.finfo(FP8).max
    qx = (x.float() / x_scale).to(FP8).float() * x_scale
    expected = qx @ dequantize_rows(layer.weight, layer.weight_scale, torch.float32).t()
    assert got.dtype == dtype and got.shape == (m, n)
    torch.testing.assert_close(got.float(), expected, rtol=2e-2, atol=2e-2)
    # And close to the unquantized product (fp8's ~3 mantissa bits).
    exact = x.float() @ weight.float().t()
    assert (got.float() - exact).abs().mean() < 0.05 * exact.abs().mean()


@pytest.mark.gpu
@needs_fp8
@pytest.mark.parametrize("m", [1, 33])
def test_scaled_mm_static_activation_scale(m):
    k, n = 4096, 6144
    torch.manual_seed(1)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    weight = (torch.randn(n, k, device="cuda") / k**0.5).to(FP8)
    method = Fp8LinearMethod(serialized=True, static_input=True)
    with torch.device("cuda"):
        layer = ColumnParallelLinear.__new__(ColumnParallelLinear)
        Linear.__init__(layer, k, n, linear_method=method, part_sizes=[4096, 1024, 1024])
    layer.weight.data.copy_(weight)
    layer.weight_scale.data.copy_(torch.tensor([0.01, 0.02, 0.03]))
    x_scale = x.abs().max().float() / 400
    layer.input_scale.data.copy_(torch.stack([x_scale, x_scale / 2, x_scale / 3]))
    method.process_weights_after_loading(layer)
    got = method.apply(layer, x, None)
    qx = (x.float() / x_scale).to(FP8).float() * x_scale
    expected = qx @ dequantize_rows(layer.weight, layer.weight_scale, torch.float32).t()
    torch.testing.assert_close(got.float(), expected, rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
@needs_fp8
@pytest.mark.parametrize("checkpoint", ["dynamic", "static"])
def test_norms_and_activation_quantize_for_the_fp8_matmuls_as_the_matmuls_would(checkpoint, prompts, tmp_path, monkeypatch):
    """The norms and SiLU-and-mul write the fp8 GEMMs' inputs (fused); with that turned off each
    GEMM quantizes its input itself: the same bits, so the same logprobs."""
    src = save_tiny_model("llama3", tmp_path)
    path, engine = src, {"quantization": "fp8"}
    if checkpoint == "static":
        path, engine = tmp_path / "fp8", {}
        pack_checkpoint(src, path, lambda w: fp8_per_tensor(w, input_scale=float(w.abs().max()) / 100), HF_FP8_STATIC)

    def run() -> list[list[float]]:
        llm = LLM(model=str(path), device="cuda", dtype="bfloat16", skip_tokenizer_init=True, block_size=16,
                  gpu_memory_utilization=0.2, **engine)
        try:
            params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, logprobs=0, prompt_logprobs=0)
            outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        finally:
            llm.shutdown()
        return [[next(iter(lp.values())).logprob for lp in o.outputs[0].logprobs] for o in outputs]

    from pagoda.kernels import elementwise

    calls = []  # the GEMMs that quantize their input themselves: o_proj alone when fused
    quantize = elementwise.fp8_quantize_rows
    monkeypatch.setattr(elementwise, "fp8_quantize_rows", lambda *a: calls.append(1) or quantize(*a))
    fused, fused_calls = run(), len(calls)
    monkeypatch.setattr(Fp8LinearMethod, "input_quantization", lambda self, layer: None)
    assert run() == fused
    assert 0 < fused_calls and 4 * fused_calls == len(calls) - fused_calls
