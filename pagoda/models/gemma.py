"""Gemma 2 and Gemma 3 (text): the Llama attention and gated MLP (GeGLU) in Gemma's decoder layer,
which normalises each sublayer's output as well as its input, with (1 + weight) RMSNorms and
embeddings scaled by sqrt(hidden_size). Sliding-window and global layers alternate (the spec's
per-layer windows); Gemma 2 soft-caps attention scores and final logits; Gemma 3 normalises q
and k and gives its sliding-window layers their own rope base. The attention scale, caps, windows
and local rope come from the spec (pagoda/config/resolve.py); llama.py applies them."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from pagoda.attention.backend import AttentionBackend, AttentionMetadata
from pagoda.config.model_spec import ModelSpec
from pagoda.layers.mlp import GatedMLP
from pagoda.layers.norm import GemmaRMSNorm, RMSNorm
from pagoda.layers.rotary import RotaryEmbedding
from pagoda.models.llama import LlamaAttention, LlamaForCausalLM, norm_input
from pagoda.quantization.base import QuantizationConfig


class GemmaDecoderLayer(nn.Module):
    def __init__(
        self,
        config: ModelSpec,
        layer_index: int,
        rotary: RotaryEmbedding,
        backend: AttentionBackend,
        quant_config: QuantizationConfig | None,
        **attn_kw: bool,
    ) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(
            config, rotary, backend, **attn_kw, quant_config=quant_config, layer_index=layer_index,
            norm_cls=GemmaRMSNorm,
        )
        self.mlp = GatedMLP(
            config.hidden_size, config.intermediate_size, config.hidden_act, False, quant_config,
            f"model.layers.{layer_index}.mlp",
        )
        hidden, eps = config.hidden_size, config.rms_norm_eps
        self.input_layernorm = GemmaRMSNorm(hidden, eps)
        self.post_attention_layernorm = GemmaRMSNorm(hidden, eps)
        self.pre_feedforward_layernorm = GemmaRMSNorm(hidden, eps)
        self.post_feedforward_layernorm = GemmaRMSNorm(hidden, eps)

    def forward(
        self,
        positions: torch.Tensor,
        hidden: torch.Tensor,
        residual: torch.Tensor | None,
        kv_cache: torch.Tensor,
        metadata: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # The residual add is fused into the next norm, as in the Llama layer: the sublayers'
        # normalised outputs are what is added.
        attn_quant, mlp_quant = self.self_attn.qkv_proj.input_quantization(), self.mlp.input_quantization()
        hidden, residual = norm_input(self.input_layernorm, hidden, residual, attn_quant)
        hidden = self.post_attention_layernorm(self.self_attn(positions, hidden, kv_cache, metadata))
        hidden, residual = self.pre_feedforward_layernorm(hidden, residual, mlp_quant)
        return self.post_feedforward_layernorm(self.mlp(hidden)), residual


class Gemma2ForCausalLM(LlamaForCausalLM):
    decoder_layer_cls: ClassVar[type[nn.Module]] = GemmaDecoderLayer
    norm_cls: ClassVar[type[RMSNorm]] = GemmaRMSNorm
    norms_per_layer: ClassVar[int] = 4
    scale_embeddings: ClassVar[bool] = True


class Gemma3ForCausalLM(Gemma2ForCausalLM):
    qk_norm = True
