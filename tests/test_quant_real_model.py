"""Issue 15's real-model check, on the CPU: the embedded default model quantized to fp8 (weights
and KV cache) and to 4-bit round-to-nearest weights in AWQ's layout keeps its perplexity on a
fixed English text within 3 % and 15 % of the unquantized model's, and still answers the
README's question."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from pagoda import LLM, SamplingParams

_SCRIPT = Path(__file__).parent.parent / "scripts" / "quant_perplexity.py"
_spec = importlib.util.spec_from_file_location("quant_perplexity", _SCRIPT)
quant_perplexity = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(quant_perplexity)

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def base_perplexity() -> float:
    return quant_perplexity.perplexity(quant_perplexity.unquantized())


def _answer(llm: LLM) -> str:
    return llm.chat(QUESTION, SamplingParams(temperature=0, max_tokens=16), use_tqdm=False)[0].outputs[0].text


def test_fp8_weights_and_kv_cache(base_perplexity):
    llm = LLM(device="cpu", dtype="float32", quantization="fp8", kv_cache_dtype="fp8")
    assert quant_perplexity.perplexity(llm) / base_perplexity < 1.03
    assert "Paris" in _answer(llm)


def test_awq_4bit_round_to_nearest(base_perplexity, tmp_path):
    llm = LLM(model=str(quant_perplexity.write_awq(tmp_path / "awq")), device="cpu", dtype="float32")
    ratio = quant_perplexity.perplexity(llm) / base_perplexity
    assert 1.0 < ratio < 1.15  # 4 bits cost something, and not too much
    assert "Paris" in _answer(llm)
