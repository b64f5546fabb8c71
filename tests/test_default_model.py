"""The embedded default model through the whole engine: `LLM()` with no model, chat, text,
stop strings and logprobs with its real tokenizer."""

from __future__ import annotations

import pytest

from pagoda import LLM, SamplingParams

pytestmark = pytest.mark.slow

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def llm(loader_default_model_dir) -> LLM:
    with pytest.MonkeyPatch.context() as patch:
        # LLM() with no model must find the converted model in the cache, not convert again.
        patch.setenv("PAGODA_CACHE_DIR", str(loader_default_model_dir.parent.parent))
        return LLM(device="cpu", max_model_len=2048)


def test_default_model_answers_paris(llm):
    out = llm.chat(QUESTION, SamplingParams(temperature=0.0, max_tokens=24), use_tqdm=False)[0]
    assert "Paris" in out.outputs[0].text
    assert out.outputs[0].finish_reason in ("stop", "length")


def test_text_is_the_decoded_tokens(llm):
    params = SamplingParams(temperature=0.8, seed=3, max_tokens=40, ignore_eos=True)
    out = llm.generate(["Write a list of French cities: Lyon, Marseille,"], params, use_tqdm=False)[0]
    completion = out.outputs[0]
    decoded = llm.get_tokenizer().decode(completion.token_ids, skip_special_tokens=True)
    assert completion.text.strip() == decoded.strip()
    assert "\ufffd" not in completion.text


def test_stop_string_cuts_the_text_exactly(llm):
    greedy = llm.chat(QUESTION, SamplingParams(temperature=0.0, max_tokens=24), use_tqdm=False)[0].outputs[0]
    stop = "Paris"
    cut = llm.chat(QUESTION, SamplingParams(temperature=0.0, max_tokens=24, stop=[stop]), use_tqdm=False)[0]
    assert cut.outputs[0].text == greedy.text[: greedy.text.index(stop)]
    assert cut.outputs[0].finish_reason == "stop" and cut.outputs[0].stop_reason == stop
    kept = llm.chat(QUESTION, SamplingParams(temperature=0.0, max_tokens=24, stop=[stop],
                                             include_stop_str_in_output=True), use_tqdm=False)[0]
    assert kept.outputs[0].text == greedy.text[: greedy.text.index(stop) + len(stop)]


def test_eos_ends_generation_with_stop(llm):
    out = llm.chat(QUESTION, SamplingParams(temperature=0.0, max_tokens=200), use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason is None
    assert out.token_ids[-1] in llm.llm_engine.processor.config.model.eos_token_ids


def test_logprobs_carry_decoded_tokens(llm):
    out = llm.generate(["The capital of France is"], SamplingParams(temperature=0.0, max_tokens=3, logprobs=2),
                       use_tqdm=False)[0].outputs[0]
    assert len(out.logprobs) == 3
    for token_id, position in zip(out.token_ids, out.logprobs):
        assert position[token_id].rank == 1  # greedy picks the most likely token
        assert len(position) <= 3
        assert all(isinstance(lp.decoded_token, str) for lp in position.values())
    assert out.cumulative_logprob == pytest.approx(sum(p[t].logprob for t, p in zip(out.token_ids, out.logprobs)))
