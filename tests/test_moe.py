"""Mixture of experts: Mixtral, Qwen2-MoE and Qwen3-MoE equal transformers' greedy tokens on a
batch mixing long and short prompts; TP=2 and expert parallelism at 2 ranks (gloo) equal one
process; the expert shards of TP and EP ranks sum to the whole layer; the fused-MoE Triton kernel
(under the interpreter without a GPU) equals the torch path; the weight estimate of the real
Mixtral 8x7B and Qwen3-30B-A3B shapes is their parameter count and that of the model built."""

from __future__ import annotations

import random

import pytest
import torch
import transformers

from pagoda import LLM, SamplingParams
from pagoda.attention import get_attention_backend
from pagoda.config.resolve import model_spec
from pagoda.distributed.parallel_state import GroupInfo
from pagoda.layers import linear, moe
from pagoda.layers.activation import get_act_and_mul
from pagoda.layers.moe import FusedMoE, experts_torch, route
from pagoda.models import model_class
from pagoda.parallel_config import estimate_weight_bytes
from tests.kernel_device import KERNELS_RUN, NO_KERNELS
from tests.test_parallel import _assert_same, _generate, _workers
from tests.tiny_models import hf_greedy, save_tiny_model

MOE_ARCHITECTURES = ["mixtral", "qwen2-moe", "qwen3-moe"]


@pytest.mark.parametrize("arch", MOE_ARCHITECTURES)
def test_long_and_short_prompts_match_transformers(arch, tmp_path):
    path = save_tiny_model(arch, tmp_path)
    rng = random.Random(4)
    prompts = [[rng.randrange(2, 256) for _ in range(n)] for n in (2, 150, 7, 93, 1)]
    expected = hf_greedy(path, prompts, 8)
    # Chunks of 32 tokens: the long prompts' prefill chunks share steps with the short ones' decodes.
    llm = LLM(model=str(path), device="cpu", skip_tokenizer_init=True, max_num_batched_tokens=32, block_size=4)
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    llm.shutdown()
    assert [o.outputs[0].token_ids for o in outputs] == expected


def test_tp2_and_expert_parallel_equal_one_process(tmp_path):
    rng = random.Random(2)
    prompts = [[rng.randrange(2, 251) for _ in range(n)] for n in (3, 40, 9)]
    path = save_tiny_model("qwen2-moe", tmp_path, vocab_size=251)
    _assert_same(_generate(path, prompts, tensor_parallel_size=2), _generate(path, prompts))
    # Experts 33 wide: no even split of each across 2 ranks, so only whole experts on ranks run it
    # (a rank that sliced them would lose a column and differ).
    path = save_tiny_model("qwen3-moe", tmp_path, vocab_size=251, moe_intermediate_size=33)
    with pytest.raises(ValueError, match=r"moe_intermediate_size.*enable_expert_parallel"):
        LLM(model=str(path), device="cpu", skip_tokenizer_init=True, tensor_parallel_size=2)
    _assert_same(_generate(path, prompts, tensor_parallel_size=2, enable_expert_parallel=True),
                 _generate(path, prompts))
    assert not _workers()


@pytest.mark.parametrize("expert_parallel", [False, True], ids=["tp", "ep"])
def test_the_shards_of_two_ranks_sum_to_the_whole_layer(expert_parallel, monkeypatch):
    g = torch.Generator().manual_seed(0)
    experts, hidden, inter = 4, 16, 12
    gate_up = torch.randn(experts, 2 * inter, hidden, generator=g)  # transformers' stacked form
    down = torch.randn(experts, hidden, inter, generator=g)
    x, logits = torch.randn(9, hidden, generator=g), torch.randn(9, experts, generator=g)

    def layer(rank: int, size: int) -> FusedMoE:
        monkeypatch.setattr(linear, "tp_group", lambda: GroupInfo(rank, size))
        monkeypatch.setattr(moe, "ep_group", lambda: GroupInfo(rank, size))
        monkeypatch.setattr(moe, "expert_parallel", lambda: expert_parallel)
        built = FusedMoE(experts, 2, hidden, inter, "silu", renormalize=True)
        built.load_weight("gate_up_proj", gate_up)
        for e in range(experts):  # per-expert tensors overwrite the down projections with the same values
            built.load_weight(f"{e}.down_proj.weight", down[e])
        return built

    whole = layer(0, 1)(x, logits)
    shards = [layer(rank, 2) for rank in (0, 1)]
    held = [tuple(s.w13.shape) for s in shards]
    assert held == ([(2, 2 * inter, hidden)] * 2 if expert_parallel else [(experts, inter, hidden)] * 2)
    torch.testing.assert_close(sum(s(x, logits) for s in shards), whole, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not KERNELS_RUN, reason=NO_KERNELS)
# Pairs per expert 0.3, 14, 35 and 300: each of default_tile_config's tilings (the widest only
# where the GPU has the shared memory for it; the interpreter takes the one below).
@pytest.mark.parametrize("tokens,experts,top_k,hidden,inter",
                         [(1, 6, 2, 32, 16), (37, 8, 3, 48, 40), (70, 4, 2, 64, 32), (600, 4, 2, 64, 32)])
def test_fused_moe_kernel_equals_the_torch_path(tokens, experts, top_k, hidden, inter):
    pytest.importorskip("triton")
    from pagoda.kernels.fused_moe import fused_experts

    device = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, hidden, generator=g)
    w13 = torch.randn(experts, 2 * inter, hidden, generator=g) / 8
    w2 = torch.randn(experts, hidden, inter, generator=g) / 8
    weights, ids = route(torch.randn(tokens, experts, generator=g), top_k, renormalize=False)
    # Shifted by one: expert 0 and ids past the last (another rank's experts) contribute nothing.
    for local_ids in (ids, ids - 1):
        ref = experts_torch(x, w13, w2, weights, local_ids, get_act_and_mul("silu"))
        on = [t.to(device) for t in (x, w13, w2, weights, local_ids)]
        tol = 1e-4 if device == "cpu" else 2e-3  # CUDA's tl.dot multiplies float32 as TF32
        torch.testing.assert_close(fused_experts(*on, "silu").cpu(), ref, rtol=tol, atol=tol)


MIXTRAL_8X7B = (transformers.MixtralConfig, dict(
    architectures=["MixtralForCausalLM"],
    hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
    num_local_experts=8, num_experts_per_tok=2, vocab_size=32000, tie_word_embeddings=False,
), 46.70e9)
QWEN3_30B_A3B = (transformers.Qwen3MoeConfig, dict(
    architectures=["Qwen3MoeForCausalLM"],
    hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_hidden_layers=48, num_attention_heads=32,
    num_key_value_heads=4, head_dim=128, num_experts=128, num_experts_per_tok=8, norm_topk_prob=True,
    vocab_size=151936, tie_word_embeddings=False,
), 30.53e9)


@pytest.mark.parametrize("known", [MIXTRAL_8X7B, QWEN3_30B_A3B], ids=["mixtral-8x7b", "qwen3-30b-a3b"])
def test_weight_estimate_counts_the_experts(known):
    config_cls, fields, published_parameters = known
    spec = model_spec(config_cls(**fields))
    model_cls = model_class(spec.architecture)
    estimate = estimate_weight_bytes(spec, torch.bfloat16)
    assert estimate / 2 == pytest.approx(published_parameters, rel=2e-3)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("meta"):
            built = model_cls(spec, get_attention_backend(torch.device("cpu")), max_position=64)
    finally:
        torch.set_default_dtype(old)
    assert estimate == sum(p.numel() * p.element_size() for p in built.parameters())
