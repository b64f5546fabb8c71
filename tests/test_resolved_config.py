"""One configuration, resolved once: the front end reads the model's config and applies every
default and rule (config/resolve.py); the engine core is built from that ResolvedConfig alone and
never finds or reads the model's config again; SamplingParams are checked once, where they are
made, not again when n fans out or when they cross to the core."""

from __future__ import annotations

import pickle

import pytest

from pagoda import LLM, SamplingParams
from pagoda.config import EngineConfig
from pagoda.config.resolve import resolve_config
from pagoda.engine import messages
from pagoda.engine.core import EngineCore
from pagoda.engine.input_processor import InputProcessor, fan_out
from pagoda.loader import model_loader, model_resolver
from tests.tiny_models import save_tiny_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny_model("qwen3", tmp_path_factory.mktemp("model"))


def _args(path, **kwargs) -> EngineConfig:
    return EngineConfig(model=str(path), device="cpu", skip_tokenizer_init=True, block_size=4, **kwargs)


def _refuse(*args, **kwargs):
    raise AssertionError("the model was found or its config read again after the front end resolved it")


@pytest.mark.parametrize("load_format", ["auto", "dummy"])
def test_the_core_is_built_from_the_resolved_config_alone(tiny, monkeypatch, load_format):
    config = InputProcessor(_args(tiny, load_format=load_format)).config
    assert pickle.loads(pickle.dumps(config)) == config  # what a core process receives
    for module, name in [(model_loader, "load_hf_config"), (model_resolver, "resolve_model"),
                         (model_loader, "load_generation_eos")]:
        monkeypatch.setattr(module, name, _refuse)
    core = EngineCore(config)
    try:
        params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
        core.add_request(messages.EngineCoreRequest("r", [5, 6, 7], fan_out("r", params)))
        tokens = []
        while core.has_unfinished_requests():
            tokens += [t for out in core.step() for t in out.new_token_ids]
    finally:
        core.shutdown()
    assert len(tokens) == 4


def test_sampling_params_are_checked_once(tiny, monkeypatch):
    checks = []
    original = SamplingParams._check_ranges
    monkeypatch.setattr(SamplingParams, "_check_ranges", lambda self: checks.append(self.n) or original(self))
    params = SamplingParams(n=3, seed=11, temperature=0.8, max_tokens=3, stop_token_ids=[9], logit_bias={4: 1.0})
    assert checks == [3]
    children = fan_out("r", params)
    received = messages.decode_to_core(messages.encode(messages.EngineCoreRequest("r", [1, 2], children)))
    assert checks == [3]  # neither the fan-out nor the core's decoding checked them again
    assert [(p.n, p.seed) for _, p in received.children] == [(1, 11), (1, 12), (1, 13)]
    assert received.children == children
    llm = LLM(**vars(_args(tiny)))
    try:
        checks.clear()
        outputs = llm.generate([{"prompt_token_ids": [3, 4, 5]}], params, use_tqdm=False)
    finally:
        llm.shutdown()
    assert checks == [] and len(outputs[0].outputs) == 3


def test_params_made_outside_the_decoder_are_still_checked():
    with messages.rebuilding_checked_params():
        pass
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0.0)


def test_the_gpu_block_size_rule_is_checked_before_any_core_starts(tiny):
    args = EngineConfig(model=str(tiny), device="cuda", block_size=8, skip_tokenizer_init=True)
    with pytest.raises(ValueError, match=r"block_size=8 is invalid on the GPU.*--block-size"):
        resolve_config(args, model_resolver.resolve_model(str(tiny)))


def test_defaults_that_depend_on_the_machine_are_resolved_once(tiny, monkeypatch):
    monkeypatch.setenv("PAGODA_CPU_KVCACHE_SPACE", "0.5")
    config = InputProcessor(_args(tiny)).config
    assert config.cache.kv_cache_memory_bytes == 1 << 29
    assert config.scheduler.max_num_batched_tokens == 2048 and not config.scheduler.async_scheduling
    assert config.model.max_model_len == config.model.spec.max_position_embeddings
    assert config.model.eos_token_ids == {1}  # the tiny model's config.json



@pytest.mark.parametrize("declared", [{"torch_dtype": "float16"}, {}])
def test_a_config_json_declares_its_dtype_by_either_name_or_none(tiny, tmp_path, monkeypatch, declared):
    """A config.json that says "torch_dtype" (written before transformers renamed it) declares its
    dtype as one that says "dtype" does; one that says neither (a GGUF file's) declares none.
    Either way the old attribute is not read: transformers logs a deprecation warning for it."""
    import json
    import shutil

    import torch
    import transformers

    path = shutil.copytree(tiny, tmp_path / "model")
    fields = json.loads((path / "config.json").read_text())
    fields.pop("dtype", None)
    (path / "config.json").write_text(json.dumps({**fields, **declared}))

    def deprecated(config):
        raise AssertionError("the config's deprecated torch_dtype was read")

    monkeypatch.setattr(transformers.PretrainedConfig, "torch_dtype", property(deprecated))
    config = InputProcessor(_args(path)).config
    assert config.model.spec.dtype == (torch.float16 if declared else None)
