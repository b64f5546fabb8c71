"""vLLM's model options on tiny random models (fp32, CPU): hf_overrides (the model's config changed
where it is read, so that the context and the forward pass both follow it), tokenizer_mode (the
slow tokenizer, and vLLM's loaders Pagoda has not refused), generation_config and
override_generation_config (the defaults of sampling fields a request leaves unset), offline and
through `pagoda serve`."""

from __future__ import annotations

import json
import shutil

import httpx
import pytest
import transformers
from transformers import ByT5Tokenizer, PreTrainedTokenizer

from pagoda import LLM, SamplingParams
from pagoda.config import EngineConfig
from pagoda.config.resolve import default_sampling
from pagoda.entrypoints.cli import build_parser
from pagoda.entrypoints.engine_args import engine_kwargs
from pagoda.loader.model_loader import load_hf_config, load_tokenizer
from pagoda.loader.model_resolver import resolve_model
from tests.serving import API_KEY, MODEL, save_tokenizer, served, tiny_model_args
from tests.tiny_models import hf_greedy, save_tiny_model

PROMPTS = [[5, 9, 2, 7], [11, 3]]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    directory = tmp_path_factory.mktemp("model-options")
    vocab_size = save_tokenizer(directory / "llama3")
    return save_tiny_model("llama3", directory, vocab_size=vocab_size, max_position_embeddings=256)


def _with_config(path, tmp_path, **changes):
    """A copy of the model at `path` whose config.json has `changes`."""
    copy = shutil.copytree(path, tmp_path / "changed")
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, **changes}))
    return copy


def test_hf_overrides_change_the_context_and_the_forward_as_a_changed_config_does(tiny, tmp_path):
    overrides = {"max_position_embeddings": 64, "rms_norm_eps": 1.0}
    llm = LLM(model=str(tiny), device="cpu", hf_overrides=overrides)
    assert llm.llm_engine.processor.config.model.max_model_len == 64  # 256 without the override
    greedy = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], greedy, use_tqdm=False)
    tokens = [list(o.outputs[0].token_ids) for o in outputs]
    assert tokens == hf_greedy(_with_config(tiny, tmp_path, **overrides), PROMPTS, 6)
    assert tokens != hf_greedy(tiny, PROMPTS, 6)  # the override bites


def test_a_rope_theta_override_changes_the_rotary_embedding(tiny, tmp_path):
    """{"rope_theta": ...} as vLLM users write it, though transformers 5 keeps it in rope_parameters."""
    llm = LLM(model=str(tiny), device="cpu", hf_overrides={"rope_theta": 7.0})
    greedy = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], greedy, use_tqdm=False)
    tokens = [list(o.outputs[0].token_ids) for o in outputs]
    rope = json.loads((tiny / "config.json").read_text())["rope_parameters"]  # llama3 scaling, kept
    changed = _with_config(tiny, tmp_path, rope_theta=7.0, rope_parameters={**rope, "rope_theta": 7.0})
    assert tokens == hf_greedy(changed, PROMPTS, 6)
    assert tokens != hf_greedy(tiny, PROMPTS, 6)


def test_hf_overrides_add_missing_keys_and_update_nested_configs(tmp_path):
    transformers.LlavaConfig(text_config={"model_type": "llama", "hidden_size": 64}).save_pretrained(tmp_path)
    overrides = {"text_config": {"max_position_embeddings": 77}, "my_field": [1, 2]}
    config = load_hf_config(resolve_model(str(tmp_path), hf_overrides=overrides))
    assert (config.text_config.max_position_embeddings, config.text_config.hidden_size) == (77, 64)
    assert config.my_field == [1, 2] and config.to_dict()["my_field"] == [1, 2]


def test_hf_overrides_must_be_an_object():
    with pytest.raises(ValueError, match=r"hf_overrides=\[1\] is invalid: must be a dict"):
        EngineConfig(hf_overrides=[1])
    with pytest.raises(SystemExit):  # argparse names the flag
        build_parser().parse_args(["serve", "--hf-overrides", "[1]"])
    args = build_parser().parse_args(["serve", "--hf-overrides", '{"rope_scaling": {"factor": 2.0}}'])
    assert EngineConfig(**engine_kwargs(args)).hf_overrides == {"rope_scaling": {"factor": 2.0}}


def test_tokenizer_mode_slow_loads_the_slow_tokenizer(tmp_path):
    tokenizer = ByT5Tokenizer()  # a tokenizer transformers has only in Python, from no vocabulary file
    tokenizer.save_pretrained(tmp_path / "llama3")
    path = save_tiny_model("llama3", tmp_path, vocab_size=len(tokenizer))
    llm = LLM(model=str(path), device="cpu", tokenizer_mode="slow")
    loaded = llm.get_tokenizer()
    assert isinstance(loaded, PreTrainedTokenizer) and not loaded.is_fast
    out = llm.generate("abc", SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)[0]
    assert out.prompt_token_ids == tokenizer("abc").input_ids
    assert out.outputs[0].text == tokenizer.decode(out.outputs[0].token_ids, skip_special_tokens=True)


def test_tokenizer_mode_reaches_the_load_as_use_fast(tiny, monkeypatch):
    """transformers 4 picks the slow class by use_fast (5 ignores it); a fast-only tokenizer is
    refused in slow mode rather than loaded fast."""
    calls = []
    load = transformers.AutoTokenizer.from_pretrained
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained",
                        lambda *args, **kwargs: calls.append(kwargs["use_fast"]) or load(*args, **kwargs))
    assert load_tokenizer(resolve_model(str(tiny)), None, "hf").is_fast
    with pytest.raises(ValueError, match="tokenizer_mode='slow': .* has no slow .*tokenizer_mode='auto'"):
        load_tokenizer(resolve_model(str(tiny)), None, "slow")
    assert calls == [True, False]


@pytest.mark.parametrize("mode", ["mistral", "custom"])
def test_vllms_other_tokenizer_modes_are_refused_at_start(mode):
    args = build_parser().parse_args(["serve", "--tokenizer-mode", mode])
    with pytest.raises(ValueError, match=f"tokenizer_mode='{mode}' is not supported: .*auto, hf, slow"):
        EngineConfig(**engine_kwargs(args))


def test_override_generation_config_is_set_over_the_generation_config(tmp_path):
    (tmp_path / "generation_config.json").write_text(json.dumps({"temperature": 0.6, "top_p": 0.9, "max_new_tokens": 7}))
    over = {"temperature": 0.0, "max_new_tokens": 3, "top_k": 5}
    assert default_sampling(EngineConfig(override_generation_config=over), tmp_path) == {
        "temperature": 0.0, "top_p": 0.9, "max_tokens": 3, "top_k": 5}
    vllm = EngineConfig(generation_config="vllm", override_generation_config=over)
    assert default_sampling(vllm, tmp_path) == {"temperature": 0.0, "max_tokens": 3, "top_k": 5}
    unset = EngineConfig(override_generation_config={"top_p": None})  # as vLLM's: null unsets the file's
    assert default_sampling(unset, tmp_path) == {"temperature": 0.6, "max_tokens": 7}
    with pytest.raises(ValueError, match=r"override_generation_config has unknown keys \['temprature'\]: "
                                         "the accepted ones are temperature, .*max_new_tokens"):
        EngineConfig(override_generation_config={"temprature": 0.5})
    bad = EngineConfig(override_generation_config={"temperature": -1})
    with pytest.raises(ValueError, match="override_generation_config=.* gives an invalid default: temperature"):
        default_sampling(bad, tmp_path)


def test_llm_takes_generation_config_vllm_and_the_override(tiny, tmp_path):
    path = shutil.copytree(tiny, tmp_path / "model")
    (path / "generation_config.json").write_text(json.dumps({"top_p": 0.5, "top_k": 3, "max_new_tokens": 2}))
    llm = LLM(model=str(path), device="cpu", generation_config="vllm",
              override_generation_config={"temperature": 0, "max_new_tokens": 5})
    defaults = llm.get_default_sampling_params()
    assert (defaults.temperature, defaults.max_tokens) == (0, 5)
    assert (defaults.top_p, defaults.top_k) == (SamplingParams().top_p, SamplingParams().top_k)  # the file's ignored
    out = llm.generate({"prompt_token_ids": PROMPTS[0]}, use_tqdm=False)[0].outputs[0]
    assert list(out.token_ids) == hf_greedy(path, PROMPTS[:1], 5)[0]  # greedy, max_new_tokens over the 16


def test_the_server_applies_the_override_over_the_models_generation_config(tmp_path):
    args = tiny_model_args(tmp_path)
    (tmp_path / "llama3" / "generation_config.json").write_text(json.dumps({"temperature": 1.5, "max_new_tokens": 2}))
    args += ["--override-generation-config", '{"temperature": 0, "max_new_tokens": 6}',
             "--hf-overrides", '{"max_position_embeddings": 300}']
    with served(args, tmp_path / "server.log") as base, httpx.Client(
        base_url=base, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60.0
    ) as http:
        assert http.get("/v1/models").json()["data"][0]["max_model_len"] == 300
        body = {"model": MODEL, "messages": [{"role": "user", "content": "hello"}], "ignore_eos": True}
        unset = [http.post("/v1/chat/completions", json={**body, "seed": seed}).json() for seed in (1, 2)]
        greedy = http.post("/v1/chat/completions", json={**body, "temperature": 0, "max_tokens": 6}).json()
        # Greedy and 6 tokens: the override over the file's temperature 1.5 and max_new_tokens 2.
        assert unset[0]["usage"]["completion_tokens"] == 6
        assert unset[0]["choices"] == unset[1]["choices"] == greedy["choices"]
        longer = http.post("/v1/chat/completions", json={**body, "temperature": 0, "max_tokens": 9}).json()
        assert longer["usage"]["completion_tokens"] == 6  # the override's max_new_tokens caps, as vLLM's
