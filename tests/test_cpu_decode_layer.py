"""A decode step's Llama layers in one C call on the CPU (pagoda/models/cpu_decode_layer.py): the same
kernels as the layers' modules in the same order, so the same bits: equal tokens and equal logprobs
with it and without it (Llama, Qwen2's biases, Qwen3's q/k norms), on a float32 and a 16-bit KV
cache, through steps of decodes (the C layers) and steps mixing prefill chunks (the modules); the
layers it does not serve left to the modules, the others then in C a layer a call; and
-O3 not compiling a model whose layers all run in C."""

from __future__ import annotations

import pytest

from pagoda import LLM, SamplingParams
from pagoda.kernels import cpu_native
from pagoda.models.cpu_decode_layer import CDecodeLayer, CDecodeStack
from tests.test_quant_w4a16_model import write_quantized
from tests.tiny_models import save_tiny_model

pytestmark = pytest.mark.skipif(
    not cpu_native.int_matmuls_available(), reason="the C int4 matmul needs AVX512-VNNI or AVX2"
)


def _model(llm: LLM):
    return llm.llm_engine.engine_core.engine_core.executor.worker.runner.model.model


def _layers(llm: LLM) -> list:
    return _model(llm).layers


def _run(llm: LLM, prompts: list[dict]) -> list[tuple]:
    # max_num_batched_tokens small enough that later prompts' chunks share steps with decodes
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True, logprobs=3)
    outs = llm.generate(prompts, params, use_tqdm=False)
    return [(o.outputs[0].token_ids, [{k: v.logprob for k, v in step.items()} for step in o.outputs[0].logprobs])
            for o in outs]


@pytest.mark.parametrize("arch, kv_cache_dtype", [
    ("llama3", "auto"), ("llama3", "bfloat16"),
    ("qwen2-mqa", "auto"),  # q/k/v biases, one KV head
    ("qwen3", "auto"),  # each head of q and k normed before the rotary
])
def test_the_c_layers_give_the_modules_bits(arch, kv_cache_dtype, tmp_path, monkeypatch):
    llm = _quantized_llm(arch, kv_cache_dtype, tmp_path)
    calls = []
    monkeypatch.setattr(CDecodeStack, "__call__", _spy(CDecodeStack.__call__, calls))
    with_c = _run(llm, PROMPTS)
    layers = _layers(llm)
    assert all(isinstance(layer.c_layer, CDecodeLayer) for layer in layers)
    assert _model(llm).c_stack.layers == [layer.c_layer for layer in layers]  # all of them in one call,
    assert all(layer.c_stack is None for layer in layers)  # and none again a layer a call
    served = [done for done in calls if done is not None]
    assert served and len(served) < len(calls)  # decode steps in C; steps with prefill chunks in the modules
    _modules_only(llm)
    assert _run(llm, PROMPTS) == with_c


def test_a_layer_the_c_code_does_not_serve_leaves_the_others_in_c(tmp_path, monkeypatch):
    """One layer left to its modules (as a GGUF layer of a type the int4 matmul does not take
    would be): the others run in C a layer a call, and the bits are still the modules'."""
    llm = _quantized_llm("llama3", "auto", tmp_path)
    _layers(llm)[1].c_layer = None  # before the first forward builds the model's C forms
    calls = []
    monkeypatch.setattr(CDecodeStack, "__call__", _spy(CDecodeStack.__call__, calls))
    with_c = _run(llm, PROMPTS)
    assert _model(llm).c_stack is None and any(done is not None for done in calls)
    assert [layer.c_stack is not None for layer in _layers(llm)] == [True, False]
    _modules_only(llm)
    assert _run(llm, PROMPTS) == with_c


PROMPTS = [{"prompt_token_ids": [3 + (5 * k + j) % 200 for j in range(4 + 9 * k)]} for k in range(4)]


def _quantized_llm(arch: str, kv_cache_dtype: str, tmp_path) -> LLM:
    model = write_quantized(save_tiny_model(arch, tmp_path), tmp_path / "awq", "awq", 32)
    return LLM(model=str(model), device="cpu", skip_tokenizer_init=True, max_model_len=128, max_num_batched_tokens=32,
               kv_cache_dtype=kv_cache_dtype, enable_prefix_caching=False)  # the same steps both runs


def _modules_only(llm: LLM) -> None:
    _model(llm).c_stack = None
    for layer in _layers(llm):
        layer.c_layer = None


def _spy(call, calls: list):
    def spied(self, *args):
        done = call(self, *args)
        calls.append(done)
        return done

    return spied


def test_layers_of_another_kind_run_their_modules(tmp_path):
    """Float32 weights (no int4 matmul): the modules, and the same tokens as transformers' path checks elsewhere."""
    llm = LLM(model=str(save_tiny_model("llama3", tmp_path)), device="cpu", skip_tokenizer_init=True, max_model_len=64)
    llm.generate([{"prompt_token_ids": [5, 6, 7]}], SamplingParams(max_tokens=3), use_tqdm=False)
    assert all(layer.c_layer is None for layer in _layers(llm))


def test_gemmas_norms_keep_the_modules(tmp_path):
    """Gemma's (1 + weight) norms, its four norms a layer and soft caps: not the C layer's kind."""
    model = write_quantized(save_tiny_model("gemma2", tmp_path), tmp_path / "awq", "awq", 32)
    llm = LLM(model=str(model), device="cpu", skip_tokenizer_init=True, max_model_len=64)
    llm.generate([{"prompt_token_ids": [5, 6, 7]}], SamplingParams(max_tokens=3), use_tqdm=False)
    assert not any(getattr(layer, "c_layer", None) for layer in _layers(llm))
    assert not llm.llm_engine.engine_core.engine_core.executor.worker.runner.model.decodes_in_c()


def test_o3_leaves_a_model_of_c_layers_uncompiled(tmp_path, caplog):
    """-O3 compiles the decode forward; where every layer runs in one C call there is nothing left
    worth compiling (the C layers were twice as fast as the compiled forward for the default model)."""
    model = write_quantized(save_tiny_model("llama3", tmp_path), tmp_path / "awq", "awq", 32)
    with caplog.at_level("INFO", logger="pagoda"):
        llm = LLM(model=str(model), device="cpu", skip_tokenizer_init=True, max_model_len=64, optimization_level=3)
    assert llm.llm_engine.engine_core.engine_core.executor.worker.runner.compiled_decode is None
    assert "each decoder layer of a decode step runs as one C call" in caplog.text
