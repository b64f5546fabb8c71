"""The EAGLE draft head (EAGLE-1) for a Llama-family target, in its published layout: `fc` maps
[the token's embedding; the target's hidden state at the position before] (2 x hidden -> hidden,
no bias, as vLLM loads it) into one Llama decoder layer that has no input norm, and there is no
final norm; the LM head is the target's (pagoda/spec/eagle.py loads it, and the embedding when
the head's checkpoint has none). Each forward reads its rows' target hidden states from
`target_hidden`, which the proposer sets before every step, and leaves its output in
`last_hidden`: the hidden state the head's next step continues from. EAGLE-3's head is
models/eagle3.py."""

from __future__ import annotations

import torch
from torch import nn

from pagoda.attention.backend import AttentionBackend, AttentionMetadata
from pagoda.config.model_spec import ModelSpec
from pagoda.layers.linear import LinearMethod
from pagoda.models.llama import LlamaForCausalLM

# The architecture name config/resolve.py gives an EAGLE head's spec (its config says LlamaForCausalLM).
EAGLE_ARCHITECTURE = "EagleLlamaForCausalLM"


class EagleLlamaForCausalLM(LlamaForCausalLM):
    def __init__(
        self, config: ModelSpec, backend: AttentionBackend, max_position: int, linear_method: LinearMethod | None = None
    ) -> None:
        super().__init__(config, backend, max_position, linear_method)
        self.fc = nn.Linear(2 * config.hidden_size, config.hidden_size, bias=False)
        # EAGLE-1's one layer takes fc's output unnormed, and its output goes to the LM head unnormed.
        for layer in self.model.layers:
            del layer.input_layernorm
        del self.model.norm
        self.target_hidden: torch.Tensor | None = None  # [rows, hidden], set by the proposer
        self.last_hidden: torch.Tensor | None = None

    @staticmethod
    def checkpoint_name(name: str) -> str:
        """The published names (the model's tensors without `model.`) as ours."""
        return f"model.{name}" if name.startswith(("layers.", "embed_tokens.", "norm.")) else name

    def combine_hidden_states(self, target_hidden: torch.Tensor) -> torch.Tensor:
        """The target's states as the head's first step reads them: as they are (its forward's
        fc mixes each in with its token's embedding)."""
        return target_hidden

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[torch.Tensor],
        metadata: AttentionMetadata,
    ) -> torch.Tensor:
        assert self.target_hidden is not None and self.target_hidden.shape[0] == input_ids.shape[0]
        hidden = self.fc(torch.cat([self.model.embed_tokens(input_ids), self.target_hidden], dim=-1))
        positions = self.model.rotary.table_index(positions, metadata)
        for layer, kv_cache in zip(self.model.layers, kv_caches):
            attended = layer.self_attn(positions, hidden, kv_cache, metadata)
            normed, residual = layer.post_attention_layernorm(attended, hidden)
            hidden = layer.mlp(normed) + residual
        self.last_hidden = hidden
        return hidden
