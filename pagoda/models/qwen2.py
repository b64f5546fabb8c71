"""Qwen2 / Qwen2.5: the Llama block with a bias on q, k and v (not on o)."""

from __future__ import annotations

from pagoda.config.model_spec import ModelSpec
from pagoda.models.llama import LlamaForCausalLM


class Qwen2ForCausalLM(LlamaForCausalLM):
    @classmethod
    def attention_switches(cls, config: ModelSpec) -> dict[str, bool]:
        return {"qkv_bias": True, "o_bias": False, "qk_norm": False}
