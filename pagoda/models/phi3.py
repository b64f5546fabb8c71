"""Phi-3 / Phi-3.5 / Phi-4 (mini): the Llama block. Its checkpoints store q|k|v and gate|up fused
(qkv_proj, gate_up_proj: our packed layers' own names, which split a fused tensor into their
parts); its rope is LongRoPE, over part of each head in Phi-4-mini (pagoda/layers/rotary.py)."""

from __future__ import annotations

from pagoda.models.llama import LlamaForCausalLM


class Phi3ForCausalLM(LlamaForCausalLM):
    pass
