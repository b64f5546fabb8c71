"""The Llama family: Llama 2/3/3.1/3.2 and Mistral. Qwen2 (q/k/v bias), Qwen3 (q/k norm), Phi-3
(fused checkpoint tensors, LongRoPE) and Gemma 2/3 (their own decoder layer and norm) reuse these
blocks with their own switches, in their own files. What the spec states is applied here for
every family: each layer's sliding window, the attention scale, the score and logit soft-caps."""

from __future__ import annotations

from itertools import islice
from typing import ClassVar

import torch
from torch import nn

from pagoda.attention.backend import AttentionBackend, AttentionMetadata
from pagoda.config.model_spec import ModelSpec
from pagoda.distributed.comm import recv_from_prev_stage, send_to_next_stage
from pagoda.distributed.parallel_state import pp_group, tp_group
from pagoda.distributed.partition import kv_head_shard, stage_layers
from pagoda.layers.attention import Attention
from pagoda.layers.linear import (
    ColumnParallelLinear,
    ParallelLMHead,
    RowParallelLinear,
    Fp8Input,
    InputQuantization,
    Shard,
    VocabParallelEmbedding,
    even_shard,
)
from pagoda.layers.mlp import GatedMLP
from pagoda.layers.moe import SparseMoeBlock
from pagoda.layers.norm import RMSNorm
from pagoda.layers.rotary import RotaryEmbedding
from pagoda.models.cpu_decode_layer import CDecodeLayer, CDecodeStack
from pagoda.models.interface import CausalLM, PPMissingLayer
from pagoda.quantization.base import QuantizationConfig, linear_method_for

_UNBUILT = object()  # LlamaDecoderLayer.c_layer before its first CPU forward


class LlamaAttention(nn.Module):
    def __init__(
        self,
        config: ModelSpec,
        rotary: RotaryEmbedding,
        backend: AttentionBackend,
        qkv_bias: bool,
        o_bias: bool,
        qk_norm: bool,
        quant_config: QuantizationConfig | None,
        layer_index: int,
        norm_cls: type[RMSNorm] = RMSNorm,
    ) -> None:
        super().__init__()
        # This TP rank's heads: its share of the query heads, and the KV heads they read.
        tp = tp_group()
        self.num_heads = config.num_attention_heads // tp.size
        first_kv_head, self.num_kv_heads = kv_head_shard(config.num_key_value_heads, tp.rank, tp.size)
        self.head_dim = d = config.head_dim
        self.q_size = self.num_heads * d
        self.kv_size = self.num_kv_heads * d
        kv = Shard(first_kv_head * d, self.kv_size, config.num_key_value_heads * d)
        q = even_shard(config.num_attention_heads * d)
        prefix = f"model.layers.{layer_index}.self_attn"
        self.qkv_proj = ColumnParallelLinear(
            config.hidden_size, {"q_proj": q, "k_proj": kv, "v_proj": kv}, bias=qkv_bias,
            linear_method=linear_method_for(quant_config, f"{prefix}.qkv_proj"),
        )
        self.o_proj = RowParallelLinear(
            q.full, config.hidden_size, bias=o_bias, linear_method=linear_method_for(quant_config, f"{prefix}.o_proj")
        )
        self.q_norm = norm_cls(self.head_dim, config.rms_norm_eps) if qk_norm else None
        self.k_norm = norm_cls(self.head_dim, config.rms_norm_eps) if qk_norm else None
        self.rotary = rotary
        scalar = config.query_pre_attn_scalar
        self.attn = Attention(
            self.num_heads, self.num_kv_heads, self.head_dim, backend,
            scale=scalar**-0.5 if scalar is not None else None,
            sliding_window=layer_window(config, layer_index),
            logits_soft_cap=config.attn_logit_softcapping,
        )

    @staticmethod
    def num_parameters(config: ModelSpec, qkv_bias: bool, o_bias: bool, qk_norm: bool) -> int:
        """Unsharded, without building the layer."""
        d = config.head_dim
        qkv = (config.num_attention_heads + 2 * config.num_key_value_heads) * d
        weights = LlamaAttention.num_linear_weights(config)
        return weights + qkv_bias * qkv + o_bias * config.hidden_size + qk_norm * 2 * d

    @staticmethod
    def num_linear_weights(config: ModelSpec) -> int:
        """Of qkv_proj's and o_proj's weights (what a quantization method holds), unsharded."""
        d = config.head_dim
        q, kv = config.num_attention_heads * d, config.num_key_value_heads * d
        return config.hidden_size * (q + 2 * kv) + q * config.hidden_size

    def forward(
        self,
        positions: torch.Tensor,
        x: torch.Tensor | Fp8Input,
        kv_cache: torch.Tensor,
        metadata: AttentionMetadata,
    ) -> torch.Tensor:
        qkv = self.qkv_proj(x)
        num_tokens = qkv.shape[0]
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(num_tokens, self.num_heads, self.head_dim)
        k = k.view(num_tokens, self.num_kv_heads, self.head_dim)
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rotary(positions, q, k)
        return self.o_proj(self.attn(q, k, v, kv_cache, metadata))


def layer_window(config: ModelSpec, layer_index: int) -> int | None:
    return config.layer_sliding_windows[layer_index] if config.layer_sliding_windows else None


def norm_input(
    norm: RMSNorm, hidden: torch.Tensor, residual: torch.Tensor | None, quant: InputQuantization | None = None
) -> tuple[torch.Tensor | Fp8Input, torch.Tensor]:
    """A decoder layer's input norm, with the residual add fused into it: (normed, residual). The
    first layer has no residual yet: its input is the residual. quant: the next matmul's input
    quantization, done by the norm's kernel."""
    if residual is None:
        return norm(hidden, quant=quant), hidden
    return norm(hidden, residual, quant)


def is_sparse_layer(config: ModelSpec, layer_index: int) -> bool:
    return bool(config.num_experts) and layer_index not in config.dense_mlp_layers


def build_mlp(config: ModelSpec, layer_index: int, quant_config: QuantizationConfig | None) -> nn.Module:
    """The layer's MLP: the sparse MoE block in an MoE model's sparse layers, else the gated MLP."""
    prefix = f"model.layers.{layer_index}.mlp"
    if is_sparse_layer(config, layer_index):
        return SparseMoeBlock(
            config.num_experts, config.num_experts_per_tok, config.hidden_size, config.moe_intermediate_size,
            config.hidden_act, config.norm_topk_prob, config.shared_expert_intermediate_size, quant_config, prefix,
        )
    return GatedMLP(
        config.hidden_size, config.intermediate_size, config.hidden_act, config.mlp_bias, quant_config, prefix
    )


def mlp_num_parameters(config: ModelSpec, layer_index: int) -> int:
    """Of `build_mlp`'s MLP, unsharded, without building it."""
    if is_sparse_layer(config, layer_index):
        return SparseMoeBlock.num_parameters(
            config.num_experts, config.hidden_size, config.moe_intermediate_size,
            config.shared_expert_intermediate_size,
        )
    return GatedMLP.num_parameters(config.hidden_size, config.intermediate_size, config.mlp_bias)


def mlp_num_linear_weights(config: ModelSpec, layer_index: int) -> int:
    """Of `build_mlp`'s quantizable linear weights (the gated MLP, or an MoE block's shared expert), unsharded."""
    if is_sparse_layer(config, layer_index):
        return GatedMLP.num_linear_weights(config.hidden_size, config.shared_expert_intermediate_size)
    return GatedMLP.num_linear_weights(config.hidden_size, config.intermediate_size)


class LlamaDecoderLayer(nn.Module):
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
            config, rotary, backend, **attn_kw, quant_config=quant_config, layer_index=layer_index
        )
        self.mlp = build_mlp(config, layer_index, quant_config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        # A decode step's layer in C on the CPU, where the layer is of that kind
        # (pagoda/models/cpu_decode_layer.py); built once its weights are loaded (built_c_layer).
        self.c_layer: CDecodeLayer | None | object = _UNBUILT
        # The layer alone in one C call, where the model's call (LlamaModel.built_c_stack) does not run them all.
        self.c_stack: CDecodeStack | None = None

    def built_c_layer(self) -> CDecodeLayer | None:
        if self.c_layer is _UNBUILT:
            self.c_layer = CDecodeLayer.of(self)
            self.c_stack = self.c_layer and CDecodeStack([self.c_layer])
        return self.c_layer

    def forward(
        self,
        positions: torch.Tensor,
        hidden: torch.Tensor,
        residual: torch.Tensor | None,
        kv_cache: torch.Tensor,
        metadata: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not hidden.is_cuda and not torch.compiler.is_compiling() and self.built_c_layer() and self.c_stack:
            done = self.c_stack(positions, hidden, residual, [kv_cache], metadata)
            if done:
                return done
        # Each norm writes its output as the matmul after it takes it (fp8 for an fp8 GEMM).
        attn_quant, mlp_quant = self.self_attn.qkv_proj.input_quantization(), self.mlp.input_quantization()
        hidden, residual = norm_input(self.input_layernorm, hidden, residual, attn_quant)
        hidden = self.self_attn(positions, hidden, kv_cache, metadata)
        hidden, residual = self.post_attention_layernorm(hidden, residual, mlp_quant)
        return self.mlp(hidden), residual


class LlamaModel(nn.Module):
    """The decoder layers of this pipeline stage. The first stage embeds the tokens (scaled by
    sqrt(hidden_size) where `scale_embeddings`: Gemma); the others receive the previous stage's
    hidden states and residual. The last stage applies the final norm; the others send their
    hidden states and residual on and return None. Sliding-window layers use the spec's local rope
    where it has one (Gemma 3)."""

    def __init__(
        self,
        config: ModelSpec,
        backend: AttentionBackend,
        max_position: int,
        quant_config: QuantizationConfig | None,
        layer_cls: type[nn.Module] = LlamaDecoderLayer,
        norm_cls: type[RMSNorm] = RMSNorm,
        scale_embeddings: bool = False,
        **attn_kw: bool,
    ) -> None:
        super().__init__()
        self.stage = pp_group()
        self.hidden_size = config.hidden_size
        self.dtype = torch.get_default_dtype()
        self.layer_range = stage_layers(config.num_hidden_layers, self.stage.rank, self.stage.size)
        self.embed_tokens = (
            VocabParallelEmbedding(config.vocab_size, config.hidden_size) if self.stage.is_first else PPMissingLayer()
        )
        self.embed_scale = config.hidden_size**0.5 if scale_embeddings else None
        self.rotary = RotaryEmbedding(config.head_dim, max_position, config.rope_parameters)
        local = config.local_rope_parameters
        # (LongRoPE's table rows, which the forward computes once, are never local rope's.)
        local_rotary = RotaryEmbedding(config.head_dim, max_position, local) if local else self.rotary
        self.layers = nn.ModuleList(
            layer_cls(
                config, i, local_rotary if layer_window(config, i) else self.rotary, backend, quant_config, **attn_kw
            )
            if i in self.layer_range else PPMissingLayer()
            for i in range(config.num_hidden_layers)
        )
        self.norm = norm_cls(config.hidden_size, config.rms_norm_eps) if self.stage.is_last else PPMissingLayer()
        self.aux_hidden_state_layers: tuple[int, ...] = ()  # CausalLM.set_aux_hidden_state_layers
        # A decode step's layers in one C call on the CPU, where each is of that kind (built_c_stack).
        self.c_stack: CDecodeStack | None | object = _UNBUILT

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[torch.Tensor],
        metadata: AttentionMetadata,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None:
        """inputs_embeds: the first stage's input embeddings where they are not the tokens' own
        (a vision-language model's, with image features merged in)."""
        if self.stage.is_first:
            hidden = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
            residual = None
            if self.embed_scale is not None:  # the scale rounded to the model dtype, as Gemma's reference does
                hidden = hidden * torch.tensor(self.embed_scale, dtype=hidden.dtype)
        else:
            shape = (input_ids.shape[0], self.hidden_size)
            hidden, residual = recv_from_prev_stage(2, shape, self.dtype, input_ids.device, self.stage)
        positions = self.rotary.table_index(positions, metadata)
        start = self.layer_range.start
        aux: list[torch.Tensor] = []
        in_c = self._decode_in_c(positions, hidden, residual, kv_caches, metadata)
        if in_c:
            hidden, residual = in_c
        else:
            for index, (layer, kv_cache) in enumerate(zip(islice(self.layers, start, None), kv_caches), start):
                if index in self.aux_hidden_state_layers:
                    aux.append(_layer_input(hidden, residual))
                hidden, residual = layer(positions, hidden, residual, kv_cache, metadata)
        if not self.stage.is_last:
            send_to_next_stage((hidden, residual), self.stage)
            return None
        if self.layer_range.stop in self.aux_hidden_state_layers:
            aux.append(_layer_input(hidden, residual))
        hidden, _ = self.norm(hidden, residual)
        return (hidden, torch.cat(aux, dim=-1)) if aux else hidden

    def built_c_stack(self) -> CDecodeStack | None:
        """This stage's layers in one C call, where each has a C form (LlamaDecoderLayer.built_c_layer)."""
        if self.c_stack is _UNBUILT:
            layers = list(islice(self.layers, self.layer_range.start, self.layer_range.stop))
            c_layers = [isinstance(layer, LlamaDecoderLayer) and layer.built_c_layer() for layer in layers]
            self.c_stack = CDecodeStack(c_layers) if c_layers and all(c_layers) else None
            if self.c_stack is not None:  # it runs their decode steps: their own calls would only check again
                for layer in layers:
                    layer.c_stack = None
        return self.c_stack

    def _decode_in_c(
        self, positions: torch.Tensor, hidden: torch.Tensor, residual: torch.Tensor | None,
        kv_caches: list[torch.Tensor], metadata: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The last layer's (hidden, residual) where this step's layers all run in one C call."""
        if hidden.is_cuda or torch.compiler.is_compiling() or self.aux_hidden_state_layers:
            return None
        stack = self.built_c_stack()
        return stack and stack(positions, hidden, residual, kv_caches, metadata)


def _layer_input(hidden: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
    """A copy of the hidden state a decoder layer reads (the layers' norms on CUDA write into the
    residual's storage, and the first layer's residual is its input)."""
    return hidden.clone() if residual is None else hidden + residual


class LlamaForCausalLM(CausalLM):
    packed_modules_mapping: ClassVar[dict[str, list[str]]] = {
        "qkv_proj": ["q_proj", "k_proj", "v_proj"],
        "gate_up_proj": ["gate_proj", "up_proj"],
    }
    ignored_checkpoint_suffixes: ClassVar[tuple[str, ...]] = ("rotary_emb.inv_freq",)
    # Switches the Qwen files flip; Llama's attention_bias puts a bias on q, k, v and o.
    qk_norm = False
    # What the Gemma file swaps in: its decoder layer (four norms), its norm, scaled embeddings.
    decoder_layer_cls: ClassVar[type[nn.Module]] = LlamaDecoderLayer
    norm_cls: ClassVar[type[RMSNorm]] = RMSNorm
    norms_per_layer: ClassVar[int] = 2
    scale_embeddings: ClassVar[bool] = False

    def __init__(
        self, config: ModelSpec, backend: AttentionBackend, max_position: int,
        quant_config: QuantizationConfig | None = None,
    ) -> None:
        super().__init__(config, backend, max_position, quant_config)
        self.config = config
        self.model = LlamaModel(
            config, backend, max_position, quant_config, self.decoder_layer_cls, self.norm_cls,
            self.scale_embeddings, **self.attention_switches(config),
        )
        self.tie_word_embeddings = config.tie_word_embeddings
        is_last = pp_group().is_last
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size) if is_last else PPMissingLayer()
        if self.tie_word_embeddings and is_last and pp_group().is_first:
            self.lm_head.weight = self.model.embed_tokens.weight

    @classmethod
    def attention_switches(cls, config: ModelSpec) -> dict[str, bool]:
        bias = config.attention_bias
        return {"qkv_bias": bias, "o_bias": bias, "qk_norm": cls.qk_norm}

    @classmethod
    def weight_bytes(
        cls, config: ModelSpec, dtype: torch.dtype, quant_config: QuantizationConfig | None = None
    ) -> int:
        hidden, layers = config.hidden_size, config.num_hidden_layers
        layer = LlamaAttention.num_parameters(config, **cls.attention_switches(config)) + cls.norms_per_layer * hidden
        mlps = sum(mlp_num_parameters(config, i) for i in range(layers))
        embeddings = config.vocab_size * hidden * (1 if config.tie_word_embeddings else 2)
        total = embeddings + layers * layer + mlps + hidden
        if quant_config is None:
            return total * dtype.itemsize
        linear = layers * LlamaAttention.num_linear_weights(config) + sum(
            mlp_num_linear_weights(config, i) for i in range(layers)
        )
        return (total - linear) * dtype.itemsize + quant_config.weight_bytes(linear, dtype)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[torch.Tensor],
        metadata: AttentionMetadata,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None:
        return self.model(input_ids, positions, kv_caches, metadata)

    def set_aux_hidden_state_layers(self, layers: tuple[int, ...]) -> None:
        self.model.aux_hidden_state_layers = layers

    def decodes_in_c(self) -> bool:
        return self.model.built_c_stack() is not None

    def compute_logits(self, hidden: torch.Tensor, argmax_only: bool = False) -> torch.Tensor:
        logits = self.lm_head(hidden, argmax_only)
        cap = self.config.final_logit_softcapping
        return logits if cap is None else torch.tanh(logits.float() / cap) * cap

    def tied_parameters(self) -> dict[str, str]:
        return {"lm_head.weight": "model.embed_tokens.weight"} if self.tie_word_embeddings else {}


class MistralForCausalLM(LlamaForCausalLM):
    pass
