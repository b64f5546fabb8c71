"""The `eagle3` method with random EAGLE-3 heads written in the published layout (`fc` over three
target layers' hidden states, `midlayer.*` with q/k/v over [embedding; hidden] and a
hidden_norm, `norm`, an `lm_head` over the draft vocabulary, `d2t`/`t2d`; no embedding) over a
tiny random Llama target (fp32, CPU): greedy outputs are the same with speculation on and off
(a batch of prompts, also under chunked prefill and preemption), sampled requests run, the
runner hands the head the target layers' hidden states, the head's drafts are those of EAGLE-3
written out in plain torch over its checkpoint (also for a head without fc, which reads the
target's final hidden states), a reduced draft vocabulary's drafts are target ids through d2t,
and heads that do not fit are refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from pagoda import SamplingParams
from pagoda.config import EngineConfig
from pagoda.engine.llm_engine import LLMEngine
from pagoda.loader.weights import iter_checkpoint_weights
from pagoda.spec.eagle import EagleProposer
from tests.test_gpu_multi_token import _release
from tests.test_gpu_spec_decode import _run
from tests.test_spec_ngram import GREEDY, PROMPTS, _generate, _stats
from tests.tiny_models import save_tiny_model

VOCAB = 256  # the tiny models'


def save_eagle3_head(
    directory: Path, seed: int = 0, draft_vocab_size: int = VOCAB, with_d2t: bool = True,
    aux_layers: list[int] | None = None, norm_before_residual: bool = False,
    architecture: str = "LlamaForCausalLMEagle3", use_aux_hidden_state: bool | None = None, **overrides,
) -> str:
    """A random one-layer Llama renamed into EAGLE-3's layout, with the tensors it adds; a draft
    vocabulary smaller than the target's is a random sorted subset of its ids. use_aux_hidden_state:
    written in the config's eagle_config when given; False: no fc (the head reads the target's
    final hidden states)."""
    source = save_tiny_model("llama3", directory / "source", seed=seed, num_hidden_layers=1, **overrides)
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, tensor in iter_checkpoint_weights(source):
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            continue
        name = name.replace("model.layers.0.", "midlayer.").removeprefix("model.")
        if name.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight")):  # over [embedding; hidden]
            tensor = torch.cat([tensor, torch.randn(tensor.shape, generator=generator) * 0.2], dim=1)
        tensors[name] = tensor.contiguous()
    hidden = tensors["norm.weight"].shape[0]
    tensors["midlayer.hidden_norm.weight"] = 1 + 0.1 * torch.randn(hidden, generator=generator)
    if use_aux_hidden_state is not False:
        tensors["fc.weight"] = torch.randn(hidden, 3 * hidden, generator=generator) * 0.1
    tensors["lm_head.weight"] = torch.randn(draft_vocab_size, hidden, generator=generator) * 0.2
    if with_d2t:
        target_ids = torch.randperm(VOCAB, generator=generator)[:draft_vocab_size].sort().values
        tensors["d2t"] = target_ids - torch.arange(draft_vocab_size)
        tensors["t2d"] = torch.zeros(VOCAB, dtype=torch.bool).index_fill(0, target_ids, True)
    head = directory / "head"
    head.mkdir()
    save_file(tensors, str(head / "model.safetensors"))
    config = json.loads((source / "config.json").read_text())
    # A context shorter than the engine's: published heads say 2048 and run under longer targets.
    config.update(architectures=[architecture], draft_vocab_size=draft_vocab_size,
                  max_position_embeddings=64, norm_before_residual=norm_before_residual)
    if aux_layers is not None:
        config["eagle_aux_hidden_state_layer_ids"] = aux_layers
    if use_aux_hidden_state is not None:
        config["eagle_config"] = {"use_aux_hidden_state": use_aux_hidden_state}
    (head / "config.json").write_text(json.dumps(config))
    return str(head)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("eagle3")
    # The target has 2 layers: vLLM's default layers (2, n // 2, n - 3) do not fit it; these read
    # the embeddings, layer 1's input and the last layer's output.
    aux = [0, 1, 2]
    return {
        "target": str(save_tiny_model("llama3", root / "target")),
        "deep-target": str(save_tiny_model("llama3", root / "deep-target", num_hidden_layers=8)),
        "eagle3": save_eagle3_head(root / "eagle3", aux_layers=aux),
        "reduced": save_eagle3_head(root / "reduced", seed=1, draft_vocab_size=48, aux_layers=aux,
                                    architecture="Eagle3LlamaForCausalLM"),  # vLLM's other spelling
        "norm-before-residual": save_eagle3_head(root / "norm-before-residual", seed=3, aux_layers=aux,
                                                 norm_before_residual=True),
        "default-layers": save_eagle3_head(root / "default-layers", seed=2),
        # No fc: it reads the target's final hidden states (vLLM's default layers would not fit).
        "final-states": save_eagle3_head(root / "final-states", seed=4, use_aux_hidden_state=False),
        "no-d2t": save_eagle3_head(root / "no-d2t", draft_vocab_size=48, with_d2t=False, aux_layers=aux),
        "narrow": save_eagle3_head(root / "narrow", aux_layers=aux, hidden_size=32, intermediate_size=64),
    }


def _engine(models: dict[str, str], head: str | None = None, target: str = "target", **overrides) -> LLMEngine:
    config = {"model": models[target], "device": "cpu", "skip_tokenizer_init": True, "max_model_len": 96,
              "block_size": 4, "num_gpu_blocks_override": 64, "max_num_batched_tokens": 32}
    if head is not None:
        config["speculative_config"] = {"method": "eagle3", "model": models[head], "num_speculative_tokens": 3}
    return LLMEngine(EngineConfig(**{**config, **overrides}))


def _proposer(engine: LLMEngine) -> EagleProposer:
    proposer = engine.engine_core.engine_core.proposer
    assert isinstance(proposer, EagleProposer)
    return proposer


@pytest.fixture(scope="module")
def plain(models) -> list[list[int]]:
    return _generate(_engine(models), GREEDY)[0]


@pytest.mark.parametrize("head", ["eagle3", "reduced", "final-states"])
def test_greedy_outputs_are_the_same_with_eagle3_drafts(models, plain, head):
    engine = _engine(models, head)
    assert _generate(engine, GREEDY)[0] == plain
    stats = _stats(engine)
    assert stats.num_drafts > 0 and stats.num_accepted_tokens < stats.num_draft_tokens  # a random head


def test_greedy_outputs_are_the_same_with_preemption_and_chunked_prefill(models, plain):
    engine = _engine(models, "eagle3", num_gpu_blocks_override=16, max_num_batched_tokens=6)
    assert _generate(engine, GREEDY)[0] == plain
    stats = _stats(engine)
    assert stats.num_preemptions > 0 and stats.num_drafts > 0


def test_vllms_default_layers_on_a_deeper_target(models):
    expected = _generate(_engine(models, target="deep-target"), GREEDY)[0]
    engine = _engine(models, "default-layers", target="deep-target")
    assert engine.engine_core.engine_core.config.speculative.aux_hidden_state_layer_ids == (2, 4, 5)
    assert _generate(engine, GREEDY)[0] == expected and _stats(engine).num_drafts > 0


def test_sampled_requests_run(models):
    params = [SamplingParams(max_tokens=20, temperature=0.9, top_p=0.95, seed=s, ignore_eos=True) for s in range(4)]
    engine = _engine(models, "reduced")
    tokens, _ = _generate(engine, params)
    assert [len(t) for t in tokens] == [20] * 4 and all(0 <= t < VOCAB for seq in tokens for t in seq)
    assert _stats(engine).num_drafts > 0
    assert _generate(_engine(models, "reduced"), params)[0] == tokens  # seeded: the same again


def test_the_head_reads_the_target_layers_hidden_states(models):
    engine = _engine(models, "eagle3")
    proposer = _proposer(engine)
    seen = []
    propose = proposer.propose_from_hidden_states

    def recording(requests, hidden):
        seen.append({rid: hidden.states[first : first + count].clone()
                     for rid, (first, position, count) in hidden.rows.items() if position == 0})
        return propose(requests, hidden)

    proposer.propose_from_hidden_states = recording
    engine.add_request("0", PROMPTS[0], GREEDY[0], final_only=True)
    engine.step()
    states = seen[0]["0"]  # the prompt's rows: the inputs of layers 0 and 1 and the last layer's output
    target = AutoModelForCausalLM.from_pretrained(models["target"], dtype=torch.float32)
    with torch.no_grad():
        out = target(torch.tensor([PROMPTS[0]]), output_hidden_states=True)
    embeds, layer1_input = out.hidden_states[0][0], out.hidden_states[1][0]
    assert states.shape == (len(PROMPTS[0]), 3 * 64)
    torch.testing.assert_close(states[:, :64], embeds, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(states[:, 64:128], layer1_input, atol=1e-5, rtol=1e-4)
    # The last layer's output, normed by the model's final norm, is what its LM head reads.
    final_norm = target.model.norm
    with torch.no_grad():
        torch.testing.assert_close(final_norm(states[:, 128:]), out.hidden_states[-1][0], atol=1e-4, rtol=1e-4)


def _reference_drafts(head_dir: str, target_dir: str, tokens: list[int], k: int) -> list[int]:
    """EAGLE-3's k greedy drafts after `tokens` (a prompt and its first sampled token), from the
    checkpoint's tensors and transformers' target (aux layers 0, 1 and 2 of 2 through fc; a head
    without fc: the target's final hidden states)."""
    w = dict(iter_checkpoint_weights(head_dir))
    config = LlamaConfig.from_pretrained(head_dir)
    target = AutoModelForCausalLM.from_pretrained(target_dir, dtype=torch.float32)
    prompt = tokens[:-1]
    last_output = []
    target.model.norm.register_forward_hook(lambda module, inputs, output: last_output.append(inputs[0][0]))
    with torch.no_grad():
        states = target(torch.tensor([prompt]), output_hidden_states=True).hidden_states
    aux = torch.cat([states[0][0], states[1][0], last_output[0]], dim=-1)
    head_states = aux @ w["fc.weight"].T if "fc.weight" in w else states[-1][0]  # after the final norm
    embed = target.model.embed_tokens.weight.detach()
    heads, kv_heads, d = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    rotary = LlamaRotaryEmbedding(config)

    def rms(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + config.rms_norm_eps)

    def layer(name: str) -> torch.Tensor:
        return w[f"midlayer.{name}.weight"]

    entry_tokens, entry_hidden = tokens[1:], head_states  # entry p: token p + 1, state p
    norm_before_residual = json.loads((Path(head_dir) / "config.json").read_text())["norm_before_residual"]
    drafts = []
    for _ in range(k):
        n = len(entry_tokens)
        x = torch.cat([rms(embed[entry_tokens], layer("input_layernorm")),
                       rms(entry_hidden, layer("hidden_norm"))], dim=-1)
        q = (x @ layer("self_attn.q_proj").T).view(n, heads, d).transpose(0, 1)[None]
        key = (x @ layer("self_attn.k_proj").T).view(n, kv_heads, d).transpose(0, 1)[None]
        value = (x @ layer("self_attn.v_proj").T).view(n, kv_heads, d).transpose(0, 1)[None]
        cos, sin = rotary(x[None], torch.arange(n)[None])
        q, key = apply_rotary_pos_emb(q, key, cos, sin)
        key, value = (t.repeat_interleave(heads // kv_heads, dim=1) for t in (key, value))
        attended = torch.nn.functional.scaled_dot_product_attention(q, key, value, is_causal=True)
        attended = attended[0].transpose(0, 1).reshape(n, heads * d) @ layer("self_attn.o_proj").T
        residual = attended + (x[:, -entry_hidden.shape[1]:] if norm_before_residual else entry_hidden)
        normed = rms(residual, layer("post_attention_layernorm"))
        gated = torch.nn.functional.silu(normed @ layer("mlp.gate_proj").T) * (normed @ layer("mlp.up_proj").T)
        output = gated @ layer("mlp.down_proj").T + residual  # before the final norm: the next step's state
        draft_id = int((rms(output[-1], w["norm.weight"]) @ w["lm_head.weight"].T).argmax())
        drafts.append(draft_id + int(w["d2t"][draft_id]))
        entry_tokens = [*entry_tokens, drafts[-1]]
        entry_hidden = torch.cat([entry_hidden, output[-1:]])
    return drafts


@pytest.mark.parametrize("head", ["eagle3", "reduced", "norm-before-residual", "final-states"])
def test_the_drafts_are_eagle3s_written_out_in_torch(models, plain, head):
    engine = _engine(models, head)
    proposer = _proposer(engine)
    proposals = []
    propose = proposer.propose_from_hidden_states
    proposer.propose_from_hidden_states = lambda requests, hidden: proposals.append(propose(requests, hidden)) or {}
    engine.add_request("0", PROMPTS[0], GREEDY[0], final_only=True)
    engine.step()  # the prompt's prefill: it samples the first token, then the head drafts after it
    tokens = [*PROMPTS[0], plain[0][0]]
    assert proposals[0]["0"] == _reference_drafts(models[head], models["target"], tokens, 3)


def test_a_reduced_draft_vocabulary_drafts_target_ids_through_d2t(models):
    engine = _engine(models, "reduced")
    proposer = _proposer(engine)
    head_tensors = dict(iter_checkpoint_weights(models["reduced"]))
    mapped = set((torch.arange(48) + head_tensors["d2t"]).tolist())
    assert set(proposer.head.target_token_ids.tolist()) == mapped
    assert torch.equal(proposer.head.lm_head.weight, head_tensors["lm_head.weight"])
    target = dict(iter_checkpoint_weights(models["target"]))
    assert torch.equal(proposer.head.model.embed_tokens.weight, target["model.embed_tokens.weight"])
    drafts = []
    propose = proposer.propose_from_hidden_states

    def recording(requests, hidden):
        proposed = propose(requests, hidden)
        drafts.extend(t for tokens in proposed.values() for t in tokens)
        return proposed

    proposer.propose_from_hidden_states = recording
    _generate(engine, GREEDY)
    assert len(drafts) > 20 and set(drafts) <= mapped


def test_heads_that_do_not_fit_are_refused(models):
    with pytest.raises(ValueError, match="EAGLE head of hidden size 32, the target's is 64"):
        _engine(models, "narrow")
    with pytest.raises(ValueError, match=r"draft vocabulary of 48 tokens \(draft_vocab_size\), the target's has 256: "
                                         "its checkpoint must hold d2t"):
        _engine(models, "no-d2t")
    with pytest.raises(ValueError, match=r"reads the hidden states of 3 distinct layers of the target's 0..2: "
                                         r"vLLM's default \(2, n // 2, n - 3\) gives \[2, 1, -1\]"):
        _engine(models, "default-layers")
    with pytest.raises(ValueError, match="is an EAGLE-3 head .*: use method 'eagle3'"):
        _engine(models, target="target", speculative_config={"method": "eagle", "model": models["eagle3"],
                                                            "num_speculative_tokens": 3})
    with pytest.raises(ValueError, match="is an EAGLE-3 head, which drafts for a target"):
        _engine(models, target="eagle3", max_model_len=64)
    with pytest.raises(ValueError, match="method='eagle3' is not built with several ranks yet"):
        _engine(models, "eagle3", tensor_parallel_size=2)
    with pytest.raises(ValueError, match="TransformersForCausalLM does not expose its layers' hidden states"):
        _engine(models, "eagle3", model_impl="transformers")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_eagle3_with_cuda_graphs_gives_the_greedy_tokens(tmp_path):
    """The target's decode and verification graphs return the aux layers' states besides the final ones."""
    target = str(save_tiny_model("llama3", tmp_path / "target"))
    plain, engine = _run(target, None)
    del engine
    _release()
    head = save_eagle3_head(tmp_path / "head", draft_vocab_size=48, aux_layers=[0, 1, 2])
    tokens, engine = _run(target, {"method": "eagle3", "model": head, "num_speculative_tokens": 3})
    runner = engine.engine_core.engine_core.executor.worker.runner
    assert runner.decode_graphs is not None and runner.decode_graphs.graphs
    assert tokens == plain and engine.engine_core.engine_core.scheduler.stats().num_drafts > 0
    del engine, runner
    _release()
