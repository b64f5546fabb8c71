"""ModelSpec: a model's shape and switches, read once from its Hugging Face config
(config/resolve.py) and shipped to the engine core and its workers, which build the model from
it and never read a config file or import transformers' config classes (which import tokenizers)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # a process without torch holds its dtypes by name (config/torch_values.py)
    import torch


@dataclass(frozen=True)
class ModelSpec:
    architecture: str  # the model class's name in pagoda.models' registry
    model_type: str
    num_hidden_layers: int
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    hidden_act: str
    rms_norm_eps: float
    # rope_type, rope_theta and the type's scaling settings (layers/rotary.py reads them)
    rope_parameters: dict[str, Any]
    max_position_embeddings: int | None
    # The window of each layer that attends to its last tokens only (None: to all); () when none does.
    layer_sliding_windows: tuple[int | None, ...]
    tie_word_embeddings: bool
    attention_bias: bool  # Llama's switch: a bias on q, k, v and o
    mlp_bias: bool
    dtype: torch.dtype | None  # what the checkpoint declares
    quantization: dict[str, Any] | None  # quantization_config as the checkpoint states it
    # Every value of the config, for what needs transformers' own classes again (GGUF tensor names).
    hf_config: dict[str, Any]
    # Where dummy weights differ from what transformers' model of hf_config has (an EAGLE head's
    # layout): each checkpoint tensor's name and shape; empty: transformers' (hf_checkpoint_shapes).
    checkpoint_shapes: tuple[tuple[str, tuple[int, ...]], ...] = ()
    # The rope of sliding-window layers where it differs from the others' (Gemma 3's local base).
    local_rope_parameters: dict[str, Any] | None = None
    # Gemma: attention scores scaled by query_pre_attn_scalar ** -0.5 instead of head_dim ** -0.5,
    # and attention scores / final logits soft-capped (cap * tanh(x / cap)).
    query_pre_attn_scalar: float | None = None
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    # Mixture of experts (Mixtral, Qwen2-MoE, Qwen3-MoE); num_experts 0: a dense model.
    num_experts: int = 0
    num_experts_per_tok: int = 0  # the top k experts each token is routed to
    moe_intermediate_size: int = 0  # each expert's MLP width
    norm_topk_prob: bool = True  # the top-k routing weights renormalized to sum to 1 (Mixtral: always)
    shared_expert_intermediate_size: int = 0  # Qwen2-MoE's gated shared expert; 0: none
    # Layers whose MLP is dense (intermediate_size) in an MoE model: Qwen's mlp_only_layers and
    # the layers decoder_sparse_step skips.
    dense_mlp_layers: tuple[int, ...] = ()
