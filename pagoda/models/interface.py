"""The contract every model implements: what the model runner, the weight loader and the
parallel-layout rules ask of a model, so that none of them knows an architecture.

A model (after vLLM's model interface) states
- its KV cache, one spec per attention layer this rank holds (`kv_cache_spec`);
- the bytes of its weights for a config and dtype, without being built (`weight_bytes`);
- how checkpoint tensors map onto its parameters: projections it packs into one layer
  (`packed_modules_mapping`), parameters that are copies of another tensor (`tied_parameters`),
  checkpoint module names that are other names for its own (`checkpoint_module_aliases`), and
  tensors it has no use for (`ignored_checkpoint_suffixes`); pagoda/loader/weight_loader.py
  loads every model with these, except one that reads its checkpoint itself (`load_checkpoint`:
  the transformers fallback, whose checkpoints transformers renames as it loads them);
and takes a QuantizationConfig (pagoda/quantization/) that each of its linear layers asks, by its
module path, for its LinearMethod (pagoda/layers/linear.py): how it holds and applies its weight."""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from pagoda.attention.backend import AttentionBackend, AttentionMetadata
from pagoda.attention.kv_cache_spec import FullAttentionSpec
from pagoda.config.model_spec import ModelSpec
from pagoda.layers.attention import Attention
from pagoda.quantization.base import QuantizationConfig


class PPMissingLayer(nn.Identity):
    """A module that another pipeline stage holds: a placeholder, so checkpoint names keep their
    place, whose tensors the loader skips."""


class CausalLM(nn.Module, ABC):
    # Our packed layer -> the checkpoint projections it holds side by side, in order (its parts).
    packed_modules_mapping: ClassVar[dict[str, list[str]]] = {}
    # Checkpoint tensors that are no parameter here (e.g. rotary frequencies some checkpoints store).
    ignored_checkpoint_suffixes: ClassVar[tuple[str, ...]] = ()
    # A checkpoint's module name -> ours, where they differ (Mixtral's block_sparse_moe: our mlp).
    checkpoint_module_aliases: ClassVar[dict[str, str]] = {}

    @abstractmethod
    def __init__(
        self, config: ModelSpec, backend: AttentionBackend, max_position: int,
        quant_config: QuantizationConfig | None = None,
    ) -> None:
        super().__init__()
        if quant_config is not None:  # its per-layer methods read which checkpoint parts a layer packs
            quant_config.packed_modules_mapping = self.packed_modules_mapping

    @classmethod
    @abstractmethod
    def weight_bytes(
        cls, config: ModelSpec, dtype: torch.dtype, quant_config: QuantizationConfig | None = None
    ) -> int:
        """Bytes of all the model's parameters (unsharded), in `dtype` or as `quant_config` holds
        them, from its spec alone."""

    @abstractmethod
    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[torch.Tensor],
        metadata: AttentionMetadata,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None:
        """The final hidden states on the last pipeline stage (with aux hidden states, a pair:
        `set_aux_hidden_state_layers`); None on the others (which send theirs on). kv_caches: one
        per spec of `kv_cache_spec`, in its order."""

    def decodes_in_c(self) -> bool:
        """Whether every decoder layer of a decode step runs as one C call on this CPU
        (pagoda/models/cpu_decode_layer.py): -O3 then has nothing worth compiling."""
        return False

    @abstractmethod
    def compute_logits(self, hidden: torch.Tensor, argmax_only: bool = False) -> torch.Tensor:
        """Logits over the whole vocabulary, in the model's dtype or float32 (the sampler and the
        prompt logprobs compute in float32 whichever it is). argmax_only: the caller reads only
        each row's argmax, which must stay exact; the other logits may then be approximate (a
        float32 head on the CPU: layers/lm_head_screen.py)."""

    # True: the model reads its own checkpoint (`load_checkpoint`) instead of the generic loader;
    # dummy weights still come through the generic loader, under the model's parameter names.
    loads_own_checkpoint: ClassVar[bool] = False

    def load_checkpoint(self, model_dir: Path) -> None:
        """Fill every parameter from the checkpoint in `model_dir` (models that set
        loads_own_checkpoint)."""
        raise NotImplementedError(f"{type(self).__name__} is loaded by pagoda/loader/weight_loader.py")

    # A vision-language model: it also has `encode_images` (ImageInputs -> each one's features) and
    # `embed_input_ids`, and its forward takes `inputs_embeds` (the runner merges the features in).
    is_multimodal: ClassVar[bool] = False

    # An encoder-only model (BERT): it embeds (runner='pooling') and never generates.
    is_encoder_only: ClassVar[bool] = False
    # A sequence-classification model (a cross-encoder): its pooled first token goes through
    # `classify`, and its pooled vector is the labels' logits.
    is_cross_encoder: ClassVar[bool] = False

    def classify(self, pooled: torch.Tensor) -> torch.Tensor:
        """Each prompt's pooled hidden state [prompts, hidden] -> its labels' logits (cross-encoders)."""
        raise NotImplementedError(f"{type(self).__name__} is not a sequence-classification model")

    @staticmethod
    def checkpoint_name(name: str) -> str:
        """A checkpoint tensor's name as this model's parameters spell it (the same by default)."""
        return name

    def set_aux_hidden_state_layers(self, layers: tuple[int, ...]) -> None:
        """Make `forward` return (the final hidden states, the hidden states entering each of
        `layers` side by side [tokens, len(layers) x hidden]); a layer id equal to the number of
        layers is the last layer's output. What an EAGLE-3 head reads (vLLM's aux hidden states)."""
        raise ValueError(f"{type(self).__name__} does not expose its layers' hidden states, which EAGLE-3 reads: "
                         "use a Llama-family target")

    def tied_parameters(self) -> dict[str, str]:
        """Parameter -> the checkpoint tensor it copies (a tied LM head: the embedding)."""
        return {}

    def kv_cache_spec(self, block_size: int) -> list[FullAttentionSpec]:
        """The KV cache of each attention layer this rank holds, in the order of its layers."""
        return [m.kv_cache_spec(block_size) for m in self.modules() if isinstance(m, Attention)]
