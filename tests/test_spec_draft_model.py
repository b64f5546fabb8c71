"""The `draft_model` method on tiny random models (fp32, CPU): greedy outputs are the same with
speculation on and off, with the target itself as the draft (every draft accepted) and with
another random model (few accepted), under chunked prefill and preemption; sampled requests go
through verification and keep their seeded tokens; a draft with another vocabulary is refused."""

from __future__ import annotations

import pytest

from pagoda import SamplingParams
from pagoda.config import EngineConfig
from pagoda.engine.llm_engine import LLMEngine
from tests.test_spec_ngram import GREEDY, _generate, _stats
from tests.tiny_models import save_tiny_model

K = 3


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("draft_model")
    return {
        "target": str(save_tiny_model("llama3", root / "target")),
        "other": str(save_tiny_model("llama3", root / "other", seed=1, num_hidden_layers=1)),
        "wide": str(save_tiny_model("llama3", root / "wide", vocab_size=320)),
    }


def _engine(models: dict[str, str], draft: str | None = None, **overrides) -> LLMEngine:
    config = {"model": models["target"], "device": "cpu", "skip_tokenizer_init": True, "max_model_len": 96,
              "block_size": 4, "num_gpu_blocks_override": 64, "max_num_batched_tokens": 32}
    if draft is not None:
        config["speculative_config"] = {"method": "draft_model", "model": models[draft], "num_speculative_tokens": K}
    return LLMEngine(EngineConfig(**{**config, **overrides}))


@pytest.fixture(scope="module")
def plain(models) -> tuple[list[list[int]], int]:
    return _generate(_engine(models), GREEDY)


def test_the_target_as_its_own_draft_has_every_draft_accepted(models, plain):
    expected, plain_steps = plain
    engine = _engine(models, "target")
    tokens, steps = _generate(engine, GREEDY)
    assert tokens == expected
    stats = _stats(engine)
    assert stats.num_draft_tokens > 0 and stats.num_accepted_tokens == stats.num_draft_tokens
    assert steps < plain_steps / 2


def test_another_model_as_the_draft_gives_the_same_greedy_tokens(models, plain):
    expected, _ = plain
    engine = _engine(models, "other")
    tokens, _ = _generate(engine, GREEDY)
    assert tokens == expected
    stats = _stats(engine)
    assert stats.num_draft_tokens > 0 and stats.num_accepted_tokens < stats.num_draft_tokens / 2


@pytest.mark.parametrize("draft", ["target", "other"])
def test_greedy_tokens_are_the_same_with_preemption_and_chunked_prefill(models, plain, draft):
    expected, _ = plain
    # 6-token prefill chunks; 16 blocks of 4 tokens for four requests of up to ~60 tokens: preempted.
    engine = _engine(models, draft, num_gpu_blocks_override=16, max_num_batched_tokens=6)
    tokens, _ = _generate(engine, GREEDY)
    assert tokens == expected
    stats = _stats(engine)
    assert stats.num_preemptions > 0 and stats.num_draft_tokens > 0
    if draft == "target":
        assert stats.num_accepted_tokens == stats.num_draft_tokens


def test_seeded_sampled_requests_are_verified_and_keep_their_tokens(models):
    params = [SamplingParams(max_tokens=25, temperature=0.8, seed=s, ignore_eos=True) for s in range(4)]
    expected, _ = _generate(_engine(models), params)
    engine = _engine(models, "target")
    tokens, _ = _generate(engine, params)
    assert tokens == expected
    stats = _stats(engine)
    # Greedy drafts against sampled tokens: some held, some did not.
    assert 0 < stats.num_accepted_tokens < stats.num_draft_tokens


def test_a_draft_with_another_vocabulary_is_refused(models):
    with pytest.raises(ValueError, match="vocabulary of 320 tokens.*must share the target's vocabulary"):
        _engine(models, "wide")


def test_the_older_spelling_chooses_a_draft_model(models, plain):
    engine = _engine(models, speculative_model=models["target"], num_speculative_tokens=2)
    assert engine.engine_core.engine_core.config.speculative.method == "draft_model"
    assert _generate(engine, GREEDY)[0] == plain[0]


def test_a_tensor_parallel_target_with_a_one_rank_draft(models, plain):
    """The draft runs in the engine's process (TP 1) while the target's two ranks are worker processes."""
    engine = _engine(models, "target", tensor_parallel_size=2)
    tokens, _ = _generate(engine, GREEDY)
    assert tokens == plain[0]
    stats = _stats(engine)
    assert stats.num_accepted_tokens == stats.num_draft_tokens > 0
    engine.engine_core.shutdown()
