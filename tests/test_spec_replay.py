"""The replay proposer behind scripts/bench_spec_decode.py: it replays a request's known greedy
continuation with each token wrong with probability 1 - alpha, so the engine accepts what alpha
says, and the outputs stay the greedy ones."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from pagoda.benchmarks.replay_proposer import ReplayProposer
from pagoda.config import EngineConfig
from pagoda.engine.llm_engine import LLMEngine
from tests.test_spec_ngram import GREEDY, PROMPTS, _engine, _generate, _stats
from tests.tiny_models import save_tiny_model


def test_each_draft_is_the_future_token_with_probability_alpha():
    future = list(range(100, 140))
    proposer = ReplayProposer({"r": future}, alpha=0.7, k=4, vocab_size=256, seed=1)
    right = total = 0
    for done in range(4000):
        request = SimpleNamespace(request_id="r", num_output_tokens=done % 36)
        drafts = proposer.propose([request])["r"]
        expected = future[done % 36 : done % 36 + 4]
        assert len(drafts) == len(expected) and all(0 <= t < 256 for t in drafts)
        right += sum(d == e for d, e in zip(drafts, expected))
        total += len(drafts)
    assert abs(right / total - 0.7) < 0.02


@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_the_engine_accepts_as_alpha_says_and_keeps_the_greedy_tokens(tmp_path, alpha):
    model = str(save_tiny_model("llama3", tmp_path))
    expected, _ = _generate(_engine(model), GREEDY)
    futures = {str(i): tokens for i, tokens in enumerate(expected)}
    proposer = ReplayProposer(futures, alpha=alpha, k=4, vocab_size=256)
    engine = LLMEngine(EngineConfig(model=model, device="cpu", skip_tokenizer_init=True, max_model_len=96,
                                    block_size=4, num_gpu_blocks_override=64), proposer)
    tokens, _ = _generate(engine, GREEDY)
    assert tokens == expected and len(PROMPTS) == len(tokens)
    stats = _stats(engine)
    if alpha == 1.0:
        assert stats.num_accepted_tokens == stats.num_draft_tokens > 0
    else:
        assert 0.25 < stats.num_accepted_tokens_per_pos[0] / stats.num_drafts < 0.75
