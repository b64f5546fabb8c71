"""Tiny random models of every supported architecture, saved as Hugging Face checkpoints."""

from __future__ import annotations

import copy

from pathlib import Path

import torch
import transformers

_COMMON = dict(
    vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, max_position_embeddings=512,
    # Wider than the default 0.02 so that logits are not near-flat: greedy choices are then clear-cut.
    initializer_range=0.2,
)

# name -> (config class, architecture, extra config): together they cover MHA, GQA, MQA, a head_dim
# that is not hidden/heads, tied and untied embeddings, llama3 rope scaling and q/k/v bias, and
# the Phi-3, Gemma and MoE features named at each.
ARCHITECTURES = {
    "llama3": (transformers.LlamaConfig, "LlamaForCausalLM", dict(
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
    )),
    "llama2-mha-tied": (transformers.LlamaConfig, "LlamaForCausalLM", dict(
        num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True,
    )),
    "mistral": (transformers.MistralConfig, "MistralForCausalLM", dict(
        num_attention_heads=8, num_key_value_heads=2, sliding_window=None, tie_word_embeddings=False,
    )),
    "qwen2-mqa": (transformers.Qwen2Config, "Qwen2ForCausalLM", dict(
        num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=False,
    )),
    "qwen3": (transformers.Qwen3Config, "Qwen3ForCausalLM", dict(
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, tie_word_embeddings=True,
    )),
    # Fused qkv/gate_up tensors, LongRoPE (within its pretraining length here: tests/test_new_families.py
    # crosses it) over half of each head (Phi-4-mini's partial rotary), a window on every layer.
    "phi3": (transformers.Phi3Config, "Phi3ForCausalLM", dict(
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False, sliding_window=24,
        partial_rotary_factor=0.5, original_max_position_embeddings=128, pad_token_id=0,
        rope_scaling={"rope_type": "longrope", "short_factor": [1.0, 1.3, 1.7, 2.5], "long_factor": [1.5, 2.0, 4.0, 8.0]},
    )),
    # Alternating sliding (16 tokens: most prompts here are longer) and global layers, soft-caps
    # that bite, a query_pre_attn_scalar that is not head_dim. Untied: a tied head on Gemma's
    # scaled embeddings would only ever repeat the last token of a random model.
    "gemma2": (transformers.Gemma2Config, "Gemma2ForCausalLM", dict(
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=16, tie_word_embeddings=False,
        attn_logit_softcapping=3.0, final_logit_softcapping=5.0, query_pre_attn_scalar=24,
    )),
    # q/k norm, a local rope base for the sliding layers, linear scaling on the global ones.
    "gemma3": (transformers.Gemma3TextConfig, "Gemma3ForCausalLM", dict(
        num_attention_heads=4, num_key_value_heads=1, head_dim=32, sliding_window=16, num_hidden_layers=3,
        tie_word_embeddings=False,
        sliding_window_pattern=2, rope_local_base_freq=100.0, rope_scaling={"rope_type": "linear", "factor": 2.0},
    )),
    # MoE: top-2 of 4 experts, renormalized (Mixtral always renormalizes).
    "mixtral": (transformers.MixtralConfig, "MixtralForCausalLM", dict(
        num_attention_heads=4, num_key_value_heads=2, intermediate_size=48, num_local_experts=4,
        num_experts_per_tok=2, sliding_window=None, tie_word_embeddings=False,
    )),
    # Top-2 of 6 without renormalization, the gated shared expert, a dense middle layer (mlp_only_layers).
    "qwen2-moe": (transformers.Qwen2MoeConfig, "Qwen2MoeForCausalLM", dict(
        num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=3, num_experts=6, num_experts_per_tok=2,
        moe_intermediate_size=32, shared_expert_intermediate_size=48, norm_topk_prob=False, mlp_only_layers=[1],
        tie_word_embeddings=False,
    )),
    # Top-3 of 8, renormalized, q/k norm; decoder_sparse_step 2: the first layer dense, the second sparse.
    "qwen3-moe": (transformers.Qwen3MoeConfig, "Qwen3MoeForCausalLM", dict(
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=8, num_experts_per_tok=3,
        moe_intermediate_size=32, norm_topk_prob=True, decoder_sparse_step=2, tie_word_embeddings=False,
    )),
}


def save_tiny_model(name: str, directory: Path, seed: int = 0, **overrides) -> Path:
    """overrides: config fields to change (e.g. vocab_size, to match a tokenizer)."""
    config_cls, arch, extra = ARCHITECTURES[name]
    # A copy: transformers writes rope_theta into the rope_scaling dict it is given, which would
    # then override the next model's own rope_theta.
    fields = copy.deepcopy({**_COMMON, **extra, "architectures": [arch], "eos_token_id": 1, "bos_token_id": 0})
    fields.update(overrides)
    config = config_cls(**fields)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).float().eval()
    path = directory / name
    model.save_pretrained(path)
    return path


def hf_greedy(path: Path, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """transformers' own greedy continuation of each prompt, EOS ignored."""
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    # No EOS: the engine side runs with ignore_eos, and min_new_tokens would mask EOS instead.
    model.generation_config.eos_token_id = None
    outputs = []
    with torch.no_grad():
        for prompt in prompts:
            ids = torch.tensor([prompt])
            out = model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                do_sample=False, pad_token_id=0,
            )
            outputs.append(out[0, len(prompt):].tolist())
    return outputs


def hf_logits(path: Path, token_ids: list[int]) -> torch.Tensor:
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([token_ids])).logits[0]
