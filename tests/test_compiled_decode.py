"""-O3 on the CPU (pagoda/worker/compiled_decode.py): decode steps run through one compiled graph
of the whole forward, attention an opaque op, and give transformers' greedy tokens, at every
batch size from one graph; what does not compile, or is not supported compiled, runs eagerly and
says why."""

from __future__ import annotations

import logging

import pytest

from pagoda import LLM, SamplingParams
from pagoda.worker.compiled_decode import CompiledDecode
from tests.tiny_models import hf_greedy, save_tiny_model

PROMPTS = [[5, 6, 7], [9, 10, 11, 12, 13, 14, 15, 16, 17], [20, 21, 22, 23, 24]]
MAX_TOKENS = [12, 7, 3]  # requests finish apart: decode batches of 3, 2 and 1


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny_model("llama3", tmp_path_factory.mktemp("o3-model"))


def _llm(path, **kwargs) -> LLM:
    return LLM(model=str(path), device="cpu", skip_tokenizer_init=True, block_size=4, max_model_len=64, **kwargs)


def _runner(llm: LLM):
    return llm.llm_engine.engine_core.engine_core.executor.worker.runner


def test_compiled_decode_steps_give_transformers_greedy_tokens(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("PAGODA_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    llm = _llm(tiny, optimization_level=3)
    runner = _runner(llm)
    assert runner.compiled_decode is not None
    sizes = []
    compiled_call = CompiledDecode.__call__

    def spy(self, input_ids, positions, metadata):
        sizes.append(input_ids.shape[0])
        return compiled_call(self, input_ids, positions, metadata)

    monkeypatch.setattr(CompiledDecode, "__call__", spy)
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in MAX_TOKENS]
    outputs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)
    got = [list(o.outputs[0].token_ids) for o in outputs]
    want = [tokens[:n] for tokens, n in zip(hf_greedy(tiny, PROMPTS, max(MAX_TOKENS)), MAX_TOKENS)]
    assert got == want
    assert {1, 2, 3} <= set(sizes)  # one graph served every batch size
    assert any(tmp_path.joinpath("inductor").iterdir())  # cached under PAGODA_CACHE_DIR


def test_each_model_in_a_process_runs_its_own_graph(tiny, tmp_path):
    # The graphs keep no guards: a second model must not find the first one's graph on shared code.
    other = save_tiny_model("llama3", tmp_path, seed=1, num_hidden_layers=3)
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    for path in (tiny, other, tiny):
        llm = _llm(path, optimization_level=3)
        got = [list(o.outputs[0].token_ids) for o in llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params,
                                                                  use_tqdm=False)]
        assert _runner(llm).compiled_decode is not None
        assert got == hf_greedy(path, PROMPTS, 8)


def test_a_forward_that_does_not_compile_runs_eagerly(tiny, monkeypatch, caplog):
    def fail(self, input_ids, positions, metadata):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(CompiledDecode, "__call__", fail)
    with caplog.at_level(logging.WARNING, logger="pagoda"):
        llm = _llm(tiny, optimization_level=3)
    assert "does not compile (RuntimeError: no C++ compiler); it runs eagerly" in caplog.text
    assert _runner(llm).compiled_decode is None
    out = llm.generate({"prompt_token_ids": PROMPTS[0]}, SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True),
                       use_tqdm=False)
    assert list(out[0].outputs[0].token_ids) == hf_greedy(tiny, PROMPTS[:1], 4)[0]


def test_configurations_not_compiled_say_why(tiny, caplog):
    with caplog.at_level(logging.INFO, logger="pagoda"):
        llm = _llm(tiny, optimization_level=3, enable_lora=True)
    assert "optimization_level=3: the decode forward runs eagerly with LoRA adapters" in caplog.text
    assert _runner(llm).compiled_decode is None
    assert llm.llm_engine.engine_core.engine_core.config.device.compile_decode is False


def test_level_0_runs_every_step_eagerly(tiny):
    assert _llm(tiny, optimization_level=0).llm_engine.engine_core.engine_core.config.device.enforce_eager
