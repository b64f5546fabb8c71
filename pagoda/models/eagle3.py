"""The EAGLE-3 draft head for a Llama-family target, in its published layout (as vLLM's
Eagle3LlamaForCausalLM loads it): `fc` [hidden, 3 x hidden] projects the target's hidden states
of three layers (low, mid, high; side by side) to one; the first decoder layer (`midlayer.*`)
attends over [input_layernorm(the token's embedding); hidden_norm(that state)] (its q/k/v read
2 x hidden), keeping the unnormed state as its residual (or the normed one: `norm_before_residual`);
`norm`, then `lm_head` over a draft vocabulary of `draft_vocab_size` tokens, whose ids `d2t` maps
to the target's (target id = draft id + d2t[draft id]). The embedding is the target's when the
head's checkpoint has none (pagoda/spec/eagle.py loads it).

A head whose config says `eagle_config.use_aux_hidden_state: false` has no `fc`: it reads the
target's final hidden states (after its norm, as EAGLE-1's head does) as they are.

The proposer combines the target's states through `fc` once (`combine_hidden_states`) and sets
`target_hidden` before every step; a forward leaves in `last_hidden` its output before the final
norm, which the head's next step continues from (as EAGLE-3 feeds it back)."""

from __future__ import annotations

import torch
from torch import nn

from pagoda.attention.backend import AttentionBackend, AttentionMetadata
from pagoda.config.model_spec import ModelSpec
from pagoda.layers.linear import ColumnParallelLinear, ParallelLMHead
from pagoda.layers.norm import RMSNorm
from pagoda.models.eagle import EagleLlamaForCausalLM
from pagoda.models.llama import LlamaForCausalLM
from pagoda.quantization.base import QuantizationConfig

# The architecture names of an EAGLE-3 head's config, as vLLM accepts them.
EAGLE3_ARCHITECTURES = ("LlamaForCausalLMEagle3", "Eagle3LlamaForCausalLM")
EAGLE3_ARCHITECTURE = "Eagle3LlamaForCausalLM"
# Target layers a head reads: fc takes this many hidden states side by side.
NUM_AUX_HIDDEN_STATES = 3


def draft_vocab_size(config: ModelSpec) -> int:
    """The head's LM head rows: `draft_vocab_size`, else the whole vocabulary."""
    return config.hf_config.get("draft_vocab_size") or config.vocab_size


def uses_aux_hidden_states(config: ModelSpec) -> bool:
    """Whether the head reads three target layers' states through fc (vLLM's default), not
    the target's final hidden states: its config's `eagle_config.use_aux_hidden_state`."""
    return bool((config.hf_config.get("eagle_config") or {}).get("use_aux_hidden_state", True))


def eagle3_checkpoint_shapes(config: ModelSpec) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """The layout's tensors (under Pagoda's names) from a plain Llama's of the head's config:
    the first layer's q/k/v read 2 x hidden, it has a hidden_norm, the LM head covers the draft
    vocabulary, and there is fc unless the head reads the target's final hidden states."""
    hidden = config.hidden_size
    first_layer_qkv = tuple(f"model.layers.0.self_attn.{p}_proj.weight" for p in "qkv")
    shapes = []
    for name, shape in config.checkpoint_shapes:
        if name in first_layer_qkv:
            shape = (shape[0], 2 * hidden)
        elif name == "lm_head.weight":
            shape = (draft_vocab_size(config), hidden)
        shapes.append((name, shape))
    fc = (("fc.weight", (hidden, NUM_AUX_HIDDEN_STATES * hidden)),) if uses_aux_hidden_states(config) else ()
    return (*shapes, ("model.layers.0.hidden_norm.weight", (hidden,)), *fc)


class Eagle3LlamaForCausalLM(LlamaForCausalLM):
    def __init__(
        self, config: ModelSpec, backend: AttentionBackend, max_position: int,
        quant_config: QuantizationConfig | None = None,
    ) -> None:
        super().__init__(config, backend, max_position, quant_config)
        hidden = config.hidden_size
        first = self.model.layers[0]
        first.self_attn.qkv_proj = ColumnParallelLinear(2 * hidden, first.self_attn.qkv_proj.parts,
                                                        bias=config.attention_bias)
        first.hidden_norm = RMSNorm(hidden, config.rms_norm_eps)
        self.norm_before_residual = bool(config.hf_config.get("norm_before_residual", False))
        self.fc = (nn.Linear(NUM_AUX_HIDDEN_STATES * hidden, hidden, bias=False)
                   if uses_aux_hidden_states(config) else None)
        self.tie_word_embeddings = False  # its LM head covers the draft vocabulary only
        self.lm_head = ParallelLMHead(draft_vocab_size(config), hidden)
        # Each draft token's target id: the identity until spec/eagle.py loads the checkpoint's d2t.
        self.register_buffer("target_token_ids", torch.arange(draft_vocab_size(config)), persistent=False)
        self.target_hidden: torch.Tensor | None = None  # [rows, hidden], set by the proposer
        self.last_hidden: torch.Tensor | None = None

    @staticmethod
    def checkpoint_name(name: str) -> str:
        """The published names (`midlayer.*`, the model's tensors without `model.`) as ours."""
        if name.startswith("midlayer."):
            name = "layers.0." + name.removeprefix("midlayer.")
        return EagleLlamaForCausalLM.checkpoint_name(name)

    def combine_hidden_states(self, target_hidden: torch.Tensor) -> torch.Tensor:
        """The target's aux layers' states side by side [rows, 3 x hidden] -> the head's input [rows, hidden]
        (a head without fc: the target's final states, as they are)."""
        return target_hidden if self.fc is None else self.fc(target_hidden)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[torch.Tensor],
        metadata: AttentionMetadata,
    ) -> torch.Tensor:
        assert self.target_hidden is not None and self.target_hidden.shape[0] == input_ids.shape[0]
        first, *rest = self.model.layers
        embeds = first.input_layernorm(self.model.embed_tokens(input_ids))
        hidden = first.hidden_norm(self.target_hidden)
        residual = hidden if self.norm_before_residual else self.target_hidden
        positions = self.model.rotary.table_index(positions, metadata)
        attended = first.self_attn(positions, torch.cat([embeds, hidden], dim=-1), kv_caches[0], metadata)
        normed, residual = first.post_attention_layernorm(attended, residual)
        hidden = first.mlp(normed)
        for layer, kv_cache in zip(rest, kv_caches[1:]):
            hidden, residual = layer(positions, hidden, residual, kv_cache, metadata)
        hidden, self.last_hidden = self.model.norm(hidden, residual)
        return hidden

    def compute_logits(self, hidden: torch.Tensor, argmax_only: bool = False) -> torch.Tensor:
        """Over the target's vocabulary: the draft vocabulary's logits at their target ids, -inf elsewhere."""
        draft_logits = super().compute_logits(hidden)
        logits = draft_logits.new_full((hidden.shape[0], self.config.vocab_size), float("-inf"))
        return logits.index_copy_(1, self.target_token_ids, draft_logits)
