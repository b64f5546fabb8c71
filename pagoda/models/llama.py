"""The Llama family: Llama 2/3/3.1/3.2 and Mistral. Qwen2 (q/k/v bias) and Qwen3 (q/k norm)
reuse these blocks with their own switches, in their own files."""

from __future__ import annotations

from collections.abc import Iterable
from itertools import islice
from typing import Any

import torch
from torch import nn

from pagoda.attention.backend import AttentionBackend, AttentionMetadata
from pagoda.distributed.comm import recv_from_prev_stage, send_to_next_stage
from pagoda.distributed.parallel_state import pp_group, tp_group
from pagoda.distributed.partition import kv_head_shard, stage_layers
from pagoda.layers.activation import get_act_and_mul
from pagoda.layers.attention import Attention
from pagoda.layers.linear import (
    ColumnParallelLinear,
    ParallelLMHead,
    RowParallelLinear,
    Shard,
    VocabParallelEmbedding,
    even_shard,
    load_param,
)
from pagoda.layers.norm import RMSNorm
from pagoda.layers.rotary import RotaryEmbedding, rope_parameters

# Checkpoint projection name -> (our merged layer, its part).
_MERGED_PARTS = {
    "q_proj": ("qkv_proj", "q"),
    "k_proj": ("qkv_proj", "k"),
    "v_proj": ("qkv_proj", "v"),
    "gate_proj": ("gate_up_proj", "gate"),
    "up_proj": ("gate_up_proj", "up"),
}


def head_dim_of(config: Any) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


class LlamaAttention(nn.Module):
    def __init__(
        self,
        config: Any,
        rotary: RotaryEmbedding,
        backend: AttentionBackend,
        qkv_bias: bool,
        o_bias: bool,
        qk_norm: bool,
    ) -> None:
        super().__init__()
        # This TP rank's heads: its share of the query heads, and the KV heads they read.
        tp = tp_group()
        self.num_heads = config.num_attention_heads // tp.size
        first_kv_head, self.num_kv_heads = kv_head_shard(config.num_key_value_heads, tp.rank, tp.size)
        self.head_dim = d = head_dim_of(config)
        self.q_size = self.num_heads * d
        self.kv_size = self.num_kv_heads * d
        kv = Shard(first_kv_head * d, self.kv_size, config.num_key_value_heads * d)
        q = even_shard(config.num_attention_heads * d)
        self.qkv_proj = ColumnParallelLinear(config.hidden_size, {"q": q, "k": kv, "v": kv}, bias=qkv_bias)
        self.o_proj = RowParallelLinear(q.full, config.hidden_size, bias=o_bias)
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if qk_norm else None
        self.rotary = rotary
        self.attn = Attention(self.num_heads, self.num_kv_heads, self.head_dim, backend)

    def forward(
        self,
        positions: torch.Tensor,
        x: torch.Tensor,
        kv_cache: torch.Tensor,
        metadata: AttentionMetadata,
    ) -> torch.Tensor:
        num_tokens = x.shape[0]
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(num_tokens, self.num_heads, self.head_dim)
        k = k.view(num_tokens, self.num_kv_heads, self.head_dim)
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rotary(positions, q, k)
        return self.o_proj(self.attn(q, k, v, kv_cache, metadata))


class LlamaMLP(nn.Module):
    def __init__(self, config: Any) -> None:
        super().__init__()
        bias = getattr(config, "mlp_bias", False)
        inter = even_shard(config.intermediate_size)
        self.gate_up_proj = ColumnParallelLinear(config.hidden_size, {"gate": inter, "up": inter}, bias=bias)
        self.down_proj = RowParallelLinear(inter.full, config.hidden_size, bias=bias)
        self.act = get_act_and_mul(config.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: Any, rotary: RotaryEmbedding, backend: AttentionBackend, **attn_kw: bool) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(config, rotary, backend, **attn_kw)
        self.mlp = LlamaMLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self,
        positions: torch.Tensor,
        hidden: torch.Tensor,
        residual: torch.Tensor | None,
        kv_cache: torch.Tensor,
        metadata: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual, hidden = hidden, self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(positions, hidden, kv_cache, metadata)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class LlamaModel(nn.Module):
    """The decoder layers of this pipeline stage. The first stage embeds the tokens; the others
    receive the previous stage's hidden states and residual. The last stage applies the final norm;
    the others send their hidden states and residual on and return None."""

    def __init__(self, config: Any, backend: AttentionBackend, max_position: int, **attn_kw: bool) -> None:
        super().__init__()
        self.stage = pp_group()
        self.hidden_size = config.hidden_size
        self.dtype = torch.get_default_dtype()
        self.layer_range = stage_layers(config.num_hidden_layers, self.stage.rank, self.stage.size)
        self.embed_tokens = (
            VocabParallelEmbedding(config.vocab_size, config.hidden_size) if self.stage.is_first else None
        )
        rotary = RotaryEmbedding(head_dim_of(config), max_position, rope_parameters(config))
        # Layers of other stages are empty placeholders, so checkpoint names keep their indices.
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, rotary, backend, **attn_kw) if i in self.layer_range else nn.Identity()
            for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps) if self.stage.is_last else None

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[torch.Tensor],
        metadata: AttentionMetadata,
    ) -> torch.Tensor | None:
        if self.embed_tokens is not None:
            hidden, residual = self.embed_tokens(input_ids), None
        else:
            shape = (input_ids.shape[0], self.hidden_size)
            hidden, residual = recv_from_prev_stage(2, shape, self.dtype, input_ids.device, self.stage)
        for layer, kv_cache in zip(islice(self.layers, self.layer_range.start, None), kv_caches):
            hidden, residual = layer(positions, hidden, residual, kv_cache, metadata)
        if self.norm is None:
            send_to_next_stage((hidden, residual), self.stage)
            return None
        hidden, _ = self.norm(hidden, residual)
        return hidden


class LlamaForCausalLM(nn.Module):
    # Switches the Qwen files flip; Llama's attention_bias puts a bias on q, k, v and o.
    qk_norm = False

    def __init__(self, config: Any, backend: AttentionBackend, max_position: int) -> None:
        super().__init__()
        self.config = config
        self.model = LlamaModel(config, backend, max_position, **self.attention_switches(config))
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size) if pp_group().is_last else None
        if self.tie_word_embeddings and self.lm_head is not None and self.model.embed_tokens is not None:
            self.lm_head.weight = self.model.embed_tokens.weight

    @classmethod
    def attention_switches(cls, config: Any) -> dict[str, bool]:
        bias = bool(getattr(config, "attention_bias", False))
        return {"qkv_bias": bias, "o_bias": bias, "qk_norm": cls.qk_norm}

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[torch.Tensor],
        metadata: AttentionMetadata,
    ) -> torch.Tensor | None:
        """The final hidden states on the last pipeline stage; None on the others."""
        return self.model(input_ids, positions, kv_caches, metadata)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    def kv_cache_layout(self) -> tuple[int, int, int]:
        """(layers, KV heads, head_dim) of the KV cache this rank holds."""
        attn = self.model.layers[self.model.layer_range.start].self_attn
        return len(self.model.layer_range), attn.num_kv_heads, attn.head_dim

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Copy checkpoint tensors (Hugging Face names, whole) into this rank's share of the model;
        returns what was loaded."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for name, tensor in weights:
            for target, part in self._targets(name):
                if target not in params:
                    raise ValueError(f"checkpoint tensor {name!r} has no place in {type(self).__name__}")
                module_path, _, param_name = target.rpartition(".")
                load_param(self.get_submodule(module_path), param_name, tensor, part)
                loaded.add(target)
        missing = set(params) - loaded
        if missing:
            raise ValueError(f"checkpoint lacks {len(missing)} tensors, e.g. {sorted(missing)[:3]}")
        return loaded

    def _targets(self, name: str) -> list[tuple[str, str | None]]:
        """(our parameter, part of a merged layer) that a checkpoint tensor fills on this rank:
        none for tensors another pipeline stage holds."""
        if "rotary_emb.inv_freq" in name:
            return []
        if name == "lm_head.weight":
            return [] if self.tie_word_embeddings or self.lm_head is None else [(name, None)]
        if name == "model.embed_tokens.weight":
            targets = [(name, None)] if self.model.embed_tokens is not None else []
            if self.tie_word_embeddings and self.lm_head is not None and self.model.embed_tokens is None:
                targets.append(("lm_head.weight", None))  # a tied head on a later stage than the embedding
            return targets
        if name.startswith("model.norm.") and self.model.norm is None:
            return []
        if name.startswith("model.layers.") and int(name.split(".")[2]) not in self.model.layer_range:
            return []
        module_path, _, param_name = name.rpartition(".")
        parent, _, proj = module_path.rpartition(".")
        if proj in _MERGED_PARTS:
            merged, part = _MERGED_PARTS[proj]
            return [(f"{parent}.{merged}.{param_name}", part)]
        return [(name, None)]


class MistralForCausalLM(LlamaForCausalLM):
    pass
