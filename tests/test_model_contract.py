"""The model contract (pagoda/models/interface.py) on every tiny architecture: the weight bytes a
model class counts from its spec are those of the model built; the runner's KV pool follows
each layer's KV cache spec; and a linear method plugged into every linear layer (here a test-only
one that stores weights transposed and scaled) gives the same greedy tokens."""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch
from torch import nn

from pagoda import LLM, SamplingParams
from pagoda.attention import get_attention_backend
from pagoda.config import EngineConfig
from pagoda.config.groups import ResolvedConfig
from pagoda.config.model_spec import ModelSpec
from pagoda.config.resolve import resolve_config
from pagoda.layers.linear import Linear, LinearMethod, UnquantizedLinearMethod
from pagoda.loader.model_loader import build_model
from pagoda.loader.model_resolver import resolve_model
from pagoda.models import model_class
from pagoda.quantization.base import QuantizationConfig
from pagoda.worker import model_runner
from pagoda.worker.model_runner import ModelRunner
from tests.tiny_models import ARCHITECTURES, save_tiny_model

CPU = torch.device("cpu")
# Every linear layer with a bias (Llama's attention_bias and mlp_bias) as well as the plain forms.
VARIANTS = [(name, {}) for name in sorted(ARCHITECTURES)] + [
    ("llama3", {"attention_bias": True, "mlp_bias": True}),
]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, object]:
    root = tmp_path_factory.mktemp("models")
    return {name: save_tiny_model(name, root) for name in ARCHITECTURES}


def _spec(path, **overrides) -> ModelSpec:
    return dataclasses.replace(_resolved_config(path).model.spec, **overrides)


def _resolved_config(path) -> ResolvedConfig:
    args = EngineConfig(model=str(path), load_format="dummy", device="cpu", block_size=4, max_model_len=64)
    return resolve_config(args, resolve_model(str(path)))


def _param_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())  # a tied weight counts once


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("name", "overrides"), VARIANTS)
def test_weight_bytes_are_those_of_the_built_model(models, name, overrides, dtype):
    spec = _spec(models[name], **overrides)
    model_cls = model_class(spec.architecture)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            model = model_cls(spec, get_attention_backend(CPU), max_position=64)
    finally:
        torch.set_default_dtype(old)
    assert model_cls.weight_bytes(spec, dtype) == _param_bytes(model)


def _runner(path) -> ModelRunner:
    return ModelRunner(_resolved_config(path), CPU)


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_kv_pool_follows_each_layers_spec(models, name, monkeypatch):
    # One layer's cache in another dtype (as an fp8 cache would be): the pool and the block
    # bytes follow the specs, not the model's dtype.
    def build_with_half_cache_in_last_layer(*args, **kwargs):
        model = build_model(*args, **kwargs)
        model.model.layers[-1].self_attn.attn.kv_cache_dtype = torch.float16
        return model

    monkeypatch.setattr(model_runner, "build_model", build_with_half_cache_in_last_layer)
    runner = _runner(models[name])
    config = _spec(models[name])
    specs = runner.kv_cache_spec
    assert [s.dtype for s in specs] == [torch.float32] * (config.num_hidden_layers - 1) + [torch.float16]
    head_dim = config.head_dim
    assert {(s.num_kv_heads, s.head_size, s.block_size) for s in specs} == {(config.num_key_value_heads, head_dim, 4)}
    runner.allocate_kv_cache(10)
    assert [(t.shape, t.dtype) for t in runner.kv_caches] == [
        ((2, 10, 4, s.num_kv_heads, s.head_size), s.dtype) for s in specs
    ]
    per_token = 2 * config.num_key_value_heads * head_dim
    assert runner.kv_bytes_per_block() == 4 * per_token * (4 * (config.num_hidden_layers - 1) + 2)


class TransposedScaledMethod(LinearMethod):
    """Test-only: keeps each weight transposed and doubled after loading, and undoes both in
    `apply`, as a quantization method keeps its own form of the weight."""

    def __init__(self) -> None:
        self.applied = 0

    def create_weights(self, layer: nn.Module, input_size: int, output_size: int) -> None:
        UnquantizedLinearMethod().create_weights(layer, input_size, output_size)

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        layer.weight = nn.Parameter((layer.weight.data * 2).t().contiguous(), requires_grad=False)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        self.applied += 1
        out = (x @ layer.weight) / 2
        return out if bias is None else out + bias


class OneMethodConfig(QuantizationConfig):
    """Test-only: hands every linear layer the same method."""

    name = "one-method"

    def __init__(self, method: LinearMethod) -> None:
        self.method = method

    @classmethod
    def from_config(cls, config: dict) -> OneMethodConfig:
        raise NotImplementedError

    def linear_method(self, prefix: str) -> LinearMethod:
        return self.method

    @property
    def quantizes_checkpoint(self) -> bool:
        return False  # the checkpoint is unquantized: the MoE experts stay so


def _greedy(path, prompts: list[list[int]]) -> list[list[int]]:
    llm = LLM(model=str(path), device="cpu", skip_tokenizer_init=True, max_num_batched_tokens=16, block_size=4)
    try:
        params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
        outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    finally:
        llm.shutdown()
    return [o.outputs[0].token_ids for o in outputs]


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_a_linear_method_gives_the_same_greedy_tokens(models, name, monkeypatch):
    rng = random.Random(3)
    prompts = [[rng.randrange(2, 256) for _ in range(n)] for n in (5, 23, 11)]
    expected = _greedy(models[name], prompts)
    method = TransposedScaledMethod()
    built = []

    def build_with_method(*args, **kwargs):
        built.append(build_model(*args, **kwargs, quant_config=OneMethodConfig(method)))
        return built[-1]

    monkeypatch.setattr(model_runner, "build_model", build_with_method)
    assert _greedy(models[name], prompts) == expected
    (model,) = built
    hidden = model.config.hidden_size
    for layer in model.modules():
        if isinstance(layer, Linear):
            assert layer.linear_method is method
    for layer in model.modules():
        if hasattr(layer, "qkv_proj"):
            assert layer.qkv_proj.weight.shape[0] == hidden  # [input, output]: stored transposed
        if hasattr(layer, "gate_up_proj"):
            assert layer.gate_up_proj.weight.shape[0] == hidden
    assert method.applied > 0
