"""Qwen3: the Llama block with an RMSNorm over each head of q and k before rotary."""

from __future__ import annotations

from pagoda.models.llama import LlamaForCausalLM


class Qwen3ForCausalLM(LlamaForCausalLM):
    qk_norm = True
