"""The `eagle` method with a random EAGLE-1 head written in the published layout (`fc`, one
decoder layer under `layers.0.*` without an input norm, no final norm, no LM head) over a tiny
random target (fp32, CPU): greedy outputs are the same with speculation on and off (also under
chunked prefill and preemption), the head's drafts are verified, the head reads the target's
hidden states, and a head that does not fit the target is refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from pagoda.config import EngineConfig
from pagoda.engine.llm_engine import LLMEngine
from pagoda.loader.weights import iter_checkpoint_weights
from pagoda.spec.eagle import EagleProposer
from tests.test_spec_ngram import GREEDY, _generate, _stats
from tests.tiny_models import save_tiny_model


def save_eagle_head(directory: Path, seed: int = 0, with_embedding: bool = False, **overrides) -> str:
    """A random one-layer Llama, renamed into EAGLE-1's layout, with an `fc` of its own."""
    source = save_tiny_model("llama3", directory / "source", seed=seed, num_hidden_layers=1, **overrides)
    tensors = {}
    for name, tensor in iter_checkpoint_weights(source):
        name = name.removeprefix("model.")
        if name.endswith("input_layernorm.weight") or name in ("norm.weight", "lm_head.weight"):
            continue
        if name == "embed_tokens.weight" and not with_embedding:
            continue
        tensors[name] = tensor.contiguous()
    hidden = tensors["layers.0.post_attention_layernorm.weight"].shape[0]
    torch.manual_seed(seed)
    tensors["fc.weight"] = torch.randn(hidden, 2 * hidden) * 0.05
    head = directory / "head"
    head.mkdir()
    save_file(tensors, str(head / "model.safetensors"))
    (head / "config.json").write_text((source / "config.json").read_text())
    return str(head)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("eagle")
    return {
        "target": str(save_tiny_model("llama3", root / "target")),
        "eagle": save_eagle_head(root / "eagle"),
        "eagle-embedding": save_eagle_head(root / "eagle-embedding", seed=1, with_embedding=True),
        "narrow": save_eagle_head(root / "narrow", hidden_size=32, intermediate_size=64),
    }


def _engine(models: dict[str, str], head: str | None = None, **overrides) -> LLMEngine:
    config = {"model": models["target"], "device": "cpu", "skip_tokenizer_init": True, "max_model_len": 96,
              "block_size": 4, "num_gpu_blocks_override": 64, "max_num_batched_tokens": 32}
    if head is not None:
        config["speculative_config"] = {"method": "eagle", "model": models[head], "num_speculative_tokens": 3}
    return LLMEngine(EngineConfig(**{**config, **overrides}))


@pytest.fixture(scope="module")
def plain(models) -> list[list[int]]:
    return _generate(_engine(models), GREEDY)[0]


@pytest.mark.parametrize("head", ["eagle", "eagle-embedding"])
def test_greedy_outputs_are_the_same_with_eagle_drafts(models, plain, head):
    engine = _engine(models, head)
    assert _generate(engine, GREEDY)[0] == plain
    stats = _stats(engine)
    assert stats.num_drafts > 0 and stats.num_accepted_tokens < stats.num_draft_tokens  # a random head


def test_greedy_outputs_are_the_same_with_preemption_and_chunked_prefill(models, plain):
    engine = _engine(models, "eagle", num_gpu_blocks_override=16, max_num_batched_tokens=6)
    assert _generate(engine, GREEDY)[0] == plain
    stats = _stats(engine)
    assert stats.num_preemptions > 0 and stats.num_drafts > 0


def test_the_head_loads_the_targets_lm_head_and_reads_its_hidden_states(models):
    engine = _engine(models, "eagle")
    proposer = engine.engine_core.engine_core.proposer
    assert isinstance(proposer, EagleProposer)
    target = dict(iter_checkpoint_weights(models["target"]))
    assert torch.equal(proposer.head.lm_head.weight, target["lm_head.weight"])
    assert torch.equal(proposer.head.model.embed_tokens.weight, target["model.embed_tokens.weight"])
    inputs = []
    forward = proposer.head.forward

    def recording(input_ids, positions, kv_caches, metadata):
        inputs.append((positions.tolist(), proposer.head.target_hidden.clone()))
        return forward(input_ids, positions, kv_caches, metadata)

    proposer.head.forward = recording
    _generate(engine, GREEDY)
    # The first proposal covers each prompt it drafts for from position 0 (the first prompt has 10
    # tokens: the head's entries 0..9), with a target hidden state per entry.
    positions, states = inputs[0]
    assert positions[:10] == list(range(10)) and states.shape == (len(positions), 64) and states.abs().sum() > 0


def test_a_head_that_does_not_fit_the_target_is_refused(models):
    with pytest.raises(ValueError, match="EAGLE head of hidden size 32, the target's is 64"):
        _engine(models, "narrow")
    with pytest.raises(ValueError, match="method='eagle' is not built with several ranks yet"):
        _engine(models, "eagle", tensor_parallel_size=2)
