"""The `medusa` method with random heads written in Medusa's published layout (and vLLM's), over
a tiny random target (fp32, CPU): greedy outputs are the same with speculation on and off (also
under chunked prefill and preemption), the heads' drafts are verified, and heads that do not fit
the target are refused at start-up."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from pagoda.config import EngineConfig
from pagoda.engine.llm_engine import LLMEngine
from pagoda.loader.weights import iter_checkpoint_weights
from pagoda.spec.medusa import MedusaProposer
from tests.test_spec_ngram import GREEDY, _generate, _stats
from tests.tiny_models import save_tiny_model

HIDDEN, VOCAB, HEADS, LAYERS = 64, 256, 4, 2


def save_medusa_heads(directory: Path, vllm_names: bool = False, hidden: int = HIDDEN, seed: int = 0) -> str:
    """Random heads as Medusa's training code saves them, or under vLLM's names."""
    torch.manual_seed(seed)
    tensors = {}
    for i in range(HEADS):
        for j in range(LAYERS):
            prefix = f"blocks.{i}.layers.{j}" if vllm_names else f"medusa_head.{i}.{j}"
            tensors[f"{prefix}.linear.weight"] = torch.randn(hidden, hidden) * 0.1
            tensors[f"{prefix}.linear.bias"] = torch.randn(hidden) * 0.1
        lm_head = f"lm_heads.{i}.weight" if vllm_names else f"medusa_head.{i}.{LAYERS}.weight"
        tensors[lm_head] = torch.randn(VOCAB, hidden)
    directory.mkdir(parents=True)
    save_file(tensors, str(directory / "medusa_lm_head.safetensors"))
    (directory / "config.json").write_text(json.dumps({"medusa_num_heads": HEADS, "medusa_num_layers": LAYERS}))
    return str(directory)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("medusa")
    return {
        "target": str(save_tiny_model("llama3", root / "target")),
        "medusa": save_medusa_heads(root / "medusa"),
        "vllm": save_medusa_heads(root / "vllm", vllm_names=True),
        "narrow": save_medusa_heads(root / "narrow", hidden=32),
    }


def _engine(models: dict[str, str], heads: str | None = None, k: int = 3, **overrides) -> LLMEngine:
    config = {"model": models["target"], "device": "cpu", "skip_tokenizer_init": True, "max_model_len": 96,
              "block_size": 4, "num_gpu_blocks_override": 64, "max_num_batched_tokens": 32}
    if heads is not None:
        config["speculative_config"] = {"method": "medusa", "model": models[heads], "num_speculative_tokens": k}
    return LLMEngine(EngineConfig(**{**config, **overrides}))


@pytest.fixture(scope="module")
def plain(models) -> list[list[int]]:
    return _generate(_engine(models), GREEDY)[0]


@pytest.mark.parametrize("heads", ["medusa", "vllm"])
def test_greedy_outputs_are_the_same_with_medusa_drafts(models, plain, heads):
    engine = _engine(models, heads)
    assert _generate(engine, GREEDY)[0] == plain
    stats = _stats(engine)
    assert stats.num_drafts > 0 and stats.num_accepted_tokens < stats.num_draft_tokens  # random heads: few hold


def test_greedy_outputs_are_the_same_with_preemption_and_chunked_prefill(models, plain):
    engine = _engine(models, "medusa", num_gpu_blocks_override=16, max_num_batched_tokens=6)
    assert _generate(engine, GREEDY)[0] == plain
    stats = _stats(engine)
    assert stats.num_preemptions > 0 and stats.num_drafts > 0


def test_both_layouts_load_the_same_heads(models, tmp_path):
    proposers = [_engine(models, heads).engine_core.engine_core.proposer for heads in ("medusa", "vllm")]
    assert all(isinstance(p, MedusaProposer) for p in proposers)
    assert torch.equal(proposers[0].block_weights, proposers[1].block_weights)
    assert torch.equal(proposers[0].lm_heads, proposers[1].lm_heads)


def test_heads_that_do_not_fit_the_target_are_refused(models):
    with pytest.raises(ValueError, match="hidden size 32, the target 256 and 64: they must match"):
        _engine(models, "narrow")
    with pytest.raises(ValueError, match="num_speculative_tokens=5 is more than the 4 Medusa heads"):
        _engine(models, "medusa", k=5)
    with pytest.raises(ValueError, match="method='medusa' is not built with several ranks yet"):
        _engine(models, "medusa", tensor_parallel_size=2)
    with pytest.raises(ValueError, match="method='medusa' needs"):
        _engine(models, speculative_config={"method": "medusa", "num_speculative_tokens": 2})


def test_the_heads_read_the_hidden_state_that_sampled_the_last_token(models, tmp_path):
    """Heads whose blocks are zero (x + SiLU(0) = x) and whose LM heads are the target's own
    propose, from the right hidden state, the token that state sampled: the request's last."""
    target_weights = dict(iter_checkpoint_weights(models["target"]))
    lm_head = target_weights.get("lm_head.weight", target_weights["model.embed_tokens.weight"])
    tensors = {}
    for i in range(HEADS):
        tensors[f"medusa_head.{i}.0.linear.weight"] = torch.zeros(HIDDEN, HIDDEN)
        tensors[f"medusa_head.{i}.0.linear.bias"] = torch.zeros(HIDDEN)
        tensors[f"medusa_head.{i}.1.weight"] = lm_head.clone()
    (tmp_path / "echo").mkdir()
    save_file(tensors, str(tmp_path / "echo" / "medusa_lm_head.safetensors"))
    engine = _engine({**models, "echo": str(tmp_path / "echo")}, "echo")
    proposer = engine.engine_core.engine_core.proposer
    seen = []
    propose = proposer.propose_from_hidden_states

    def recording(requests, hidden):
        drafts = propose(requests, hidden)
        # (Its last token sampled: a prompt's own last token need not be what the LM head predicts.)
        seen.extend((drafts[r.request_id], r.token_ids[-1]) for r in requests
                    if r.request_id in drafts and r.num_output_tokens)
        return drafts

    proposer.propose_from_hidden_states = recording
    _generate(engine, GREEDY)
    bad = [(d, last) for d, last in seen if d != [last] * 3]
    assert len(seen) > 20 and not bad, bad[:5]
