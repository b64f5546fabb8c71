"""The Mixture-of-Experts families: Llama-style attention (Mistral's for Mixtral, Qwen2's q/k/v
bias for Qwen2-MoE, Qwen3's q/k norm for Qwen3-MoE) with pagoda/layers/moe.py's sparse block as
the MLP of each sparse layer (llama.py's `build_mlp` picks it from the spec's MoE fields)."""

from __future__ import annotations

from typing import ClassVar

from pagoda.models.llama import MistralForCausalLM
from pagoda.models.qwen2 import Qwen2ForCausalLM
from pagoda.models.qwen3 import Qwen3ForCausalLM


class MixtralForCausalLM(MistralForCausalLM):
    # Mixtral's checkpoints name the MoE block block_sparse_moe (transformers' model itself: mlp).
    checkpoint_module_aliases: ClassVar[dict[str, str]] = {"block_sparse_moe": "mlp"}


class Qwen2MoeForCausalLM(Qwen2ForCausalLM):
    pass


class Qwen3MoeForCausalLM(Qwen3ForCausalLM):
    pass
