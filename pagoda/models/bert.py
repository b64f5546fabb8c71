"""Encoder-only models: BERT (BertModel, as sentence-transformers ships all-MiniLM and
BGE checkpoints) and RoBERTa / XLM-RoBERTa, one class for all three; and their sequence
classification models (cross-encoders such as ms-marco-MiniLM and bge-reranker), the same encoder
with the classification head over the first token. They run on an embedding engine only (--runner
pooling): a prompt is one whole step, its tokens attend to each other both ways
(layers/encoder_attention.py, no KV cache), and its final hidden states are pooled by the runner.

Token, absolute position and token-type embeddings (every token is of type 0, as
sentence-transformers encodes one sentence, unless the step gives the types: a BERT text pair's
second text is of type 1), LayerNorm; then per layer self-attention and a GELU
MLP, each followed by a LayerNorm over its output plus its input (post-norm). RoBERTa's position
ids start after its padding index (padding_idx + 1), so its context is that much shorter than
its position table (config/resolve.py). Module names are the checkpoint's (`embeddings.*`,
`encoder.layer.N.*`); a checkpoint of a model with a head (`bert.` / `roberta.` prefix) loads too,
its head ignored."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from pagoda.attention.backend import AttentionBackend, AttentionMetadata
from pagoda.config.model_spec import ModelSpec
from pagoda.distributed.parallel_state import pp_group, tp_group
from pagoda.layers.activation import get_act
from pagoda.layers.encoder_attention import EncoderAttention
from pagoda.layers.linear import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding, even_shard
from pagoda.models.interface import CausalLM
from pagoda.quantization.base import QuantizationConfig, linear_method_for

# Model types whose position ids are offset by the padding index (HF's
# create_position_ids_from_input_ids, for prompts without padding tokens).
_OFFSET_POSITION_MODEL_TYPES = ("roberta", "xlm-roberta")
# Prefixes under which a model with a head (BertForMaskedLM, ...) keeps the encoder's tensors.
_ENCODER_PREFIXES = ("bert.", "roberta.")


def position_offset(hf_config: dict[str, Any]) -> int:
    """The position id of a prompt's first token: padding_idx + 1 for RoBERTa, else 0."""
    if hf_config.get("model_type") in _OFFSET_POSITION_MODEL_TYPES:
        return int(hf_config.get("pad_token_id") or 0) + 1
    return 0


class BertEmbeddings(nn.Module):
    def __init__(self, config: ModelSpec) -> None:
        super().__init__()
        hf, hidden = config.hf_config, config.hidden_size
        self.word_embeddings = VocabParallelEmbedding(config.vocab_size, hidden)
        self.position_embeddings = nn.Embedding(hf["max_position_embeddings"], hidden)
        self.token_type_embeddings = nn.Embedding(hf.get("type_vocab_size") or 1, hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=hf.get("layer_norm_eps", 1e-12))
        self.position_offset = position_offset(hf)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, token_type_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        hidden = self.word_embeddings(input_ids) + self.position_embeddings(positions + self.position_offset)
        if token_type_ids is None:
            return self.LayerNorm(hidden + self.token_type_embeddings.weight[0])
        return self.LayerNorm(hidden + self.token_type_embeddings(token_type_ids))


class BertSelfAttention(nn.Module):
    def __init__(self, config: ModelSpec, quant_config: QuantizationConfig | None, prefix: str) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads // tp_group().size
        self.head_dim = config.head_dim
        heads = even_shard(config.num_attention_heads * config.head_dim)
        self.qkv_proj = ColumnParallelLinear(
            config.hidden_size, {"query": heads, "key": heads, "value": heads}, bias=True,
            linear_method=linear_method_for(quant_config, f"{prefix}.qkv_proj"),
        )
        self.attn = EncoderAttention(self.num_heads, self.head_dim)

    def forward(self, hidden: torch.Tensor, metadata: AttentionMetadata) -> torch.Tensor:
        shape = (hidden.shape[0], self.num_heads, self.head_dim)
        q, k, v = (x.reshape(shape) for x in self.qkv_proj(hidden).chunk(3, dim=-1))
        return self.attn(q, k, v, metadata)


class BertOutput(nn.Module):
    """A sub-layer's output: LayerNorm(dense(x) + the sub-layer's input)."""

    def __init__(
        self, input_size: int, config: ModelSpec, quant_config: QuantizationConfig | None, prefix: str
    ) -> None:
        super().__init__()
        self.dense = RowParallelLinear(
            input_size, config.hidden_size, bias=True, linear_method=linear_method_for(quant_config, f"{prefix}.dense")
        )
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.hf_config.get("layer_norm_eps", 1e-12))

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(x) + residual)


class BertAttention(nn.Module):
    def __init__(self, config: ModelSpec, quant_config: QuantizationConfig | None, prefix: str) -> None:
        super().__init__()
        self.self = BertSelfAttention(config, quant_config, f"{prefix}.self")
        self.output = BertOutput(config.num_attention_heads * config.head_dim, config, quant_config, f"{prefix}.output")

    def forward(self, hidden: torch.Tensor, metadata: AttentionMetadata) -> torch.Tensor:
        return self.output(self.self(hidden, metadata), hidden)


class BertIntermediate(nn.Module):
    def __init__(self, config: ModelSpec, quant_config: QuantizationConfig | None, prefix: str) -> None:
        super().__init__()
        self.dense = ColumnParallelLinear(
            config.hidden_size, {"dense": even_shard(config.intermediate_size)}, bias=True,
            linear_method=linear_method_for(quant_config, f"{prefix}.dense"),
        )
        self.act = get_act(config.hidden_act)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.act(self.dense(hidden))


class BertLayer(nn.Module):
    def __init__(self, config: ModelSpec, quant_config: QuantizationConfig | None, prefix: str) -> None:
        super().__init__()
        self.attention = BertAttention(config, quant_config, f"{prefix}.attention")
        self.intermediate = BertIntermediate(config, quant_config, f"{prefix}.intermediate")
        self.output = BertOutput(config.intermediate_size, config, quant_config, f"{prefix}.output")

    def forward(self, hidden: torch.Tensor, metadata: AttentionMetadata) -> torch.Tensor:
        hidden = self.attention(hidden, metadata)
        return self.output(self.intermediate(hidden), hidden)


class BertEncoder(nn.Module):
    def __init__(self, config: ModelSpec, quant_config: QuantizationConfig | None) -> None:
        super().__init__()
        self.layer = nn.ModuleList(
            BertLayer(config, quant_config, f"encoder.layer.{i}") for i in range(config.num_hidden_layers)
        )

    def forward(self, hidden: torch.Tensor, metadata: AttentionMetadata) -> torch.Tensor:
        for layer in self.layer:
            hidden = layer(hidden, metadata)
        return hidden


class BertEmbeddingModel(CausalLM):
    packed_modules_mapping: ClassVar[dict[str, list[str]]] = {"qkv_proj": ["query", "key", "value"]}
    # sentence-transformers pools the encoder's hidden states: BERT's own pooler (a dense + tanh
    # over [CLS]) is unused.
    ignored_checkpoint_suffixes: ClassVar[tuple[str, ...]] = (
        "pooler.dense.weight", "pooler.dense.bias", "embeddings.position_ids",
    )
    is_encoder_only: ClassVar[bool] = True

    def __init__(
        self, config: ModelSpec, backend: AttentionBackend, max_position: int,
        quant_config: QuantizationConfig | None = None,
    ) -> None:
        super().__init__(config, backend, max_position, quant_config)
        if pp_group().size > 1:
            raise ValueError(f"{config.architecture} runs on one pipeline stage: use pipeline_parallel_size=1")
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertEncoder(config, quant_config)

    @classmethod
    def weight_bytes(
        cls, config: ModelSpec, dtype: torch.dtype, quant_config: QuantizationConfig | None = None
    ) -> int:
        hf, hidden, inter = config.hf_config, config.hidden_size, config.intermediate_size
        attention = config.num_attention_heads * config.head_dim
        rows = config.vocab_size + hf["max_position_embeddings"] + (hf.get("type_vocab_size") or 1)
        linear = hidden * 3 * attention + attention * hidden + 2 * hidden * inter  # per layer
        biases_and_norms = 3 * attention + inter + 2 * hidden + 2 * 2 * hidden
        layers = config.num_hidden_layers
        plain = rows * hidden + 2 * hidden + layers * biases_and_norms
        if quant_config is None:
            return (plain + layers * linear) * dtype.itemsize
        return plain * dtype.itemsize + quant_config.weight_bytes(layers * linear, dtype)

    @staticmethod
    def checkpoint_name(name: str) -> str:
        for prefix in _ENCODER_PREFIXES:
            name = name.removeprefix(prefix)
        # Checkpoints from before transformers named LayerNorm's parameters weight and bias.
        if name.endswith(".gamma"):
            return name.removesuffix(".gamma") + ".weight"
        if name.endswith(".beta"):
            return name.removesuffix(".beta") + ".bias"
        return name

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[torch.Tensor],
        metadata: AttentionMetadata,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """kv_caches: empty (an encoder keeps none); token_type_ids: each token's (None: all 0)."""
        return self.encoder(self.embeddings(input_ids, positions, token_type_ids), metadata)

    def compute_logits(self, hidden: torch.Tensor, argmax_only: bool = False) -> torch.Tensor:
        raise NotImplementedError("an encoder-only model computes no logits: it runs with runner='pooling'")


class BertClassifierModel(BertEmbeddingModel):
    """BertForSequenceClassification, RobertaForSequenceClassification and
    XLMRobertaForSequenceClassification: `classify` turns the pooled first token's hidden state
    into the labels' logits as transformers' heads do, dense + tanh then a projection (BERT's
    pooler, then its classifier; RoBERTa's classifier.dense, then classifier.out_proj)."""

    is_cross_encoder: ClassVar[bool] = True
    ignored_checkpoint_suffixes: ClassVar[tuple[str, ...]] = ("embeddings.position_ids",)

    def __init__(
        self, config: ModelSpec, backend: AttentionBackend, max_position: int,
        quant_config: QuantizationConfig | None = None,
    ) -> None:
        super().__init__(config, backend, max_position, quant_config)
        hidden = config.hidden_size
        # Replicated on every rank: one row per prompt, too small to shard.
        self.head = nn.ModuleDict({
            "dense": nn.Linear(hidden, hidden), "out_proj": nn.Linear(hidden, num_labels(config.hf_config)),
        })

    @classmethod
    def weight_bytes(
        cls, config: ModelSpec, dtype: torch.dtype, quant_config: QuantizationConfig | None = None
    ) -> int:
        hidden, labels = config.hidden_size, num_labels(config.hf_config)
        head = (hidden + 1) * hidden + (hidden + 1) * labels
        return super().weight_bytes(config, dtype, quant_config) + head * dtype.itemsize

    @staticmethod
    def checkpoint_name(name: str) -> str:
        name = BertEmbeddingModel.checkpoint_name(name)
        for source, target in _HEAD_NAMES:
            if name.startswith(source):
                return target + name.removeprefix(source)
        return name

    def classify(self, pooled: torch.Tensor) -> torch.Tensor:
        """pooled: each prompt's first token's final hidden state [prompts, hidden] -> its logits [prompts, labels]."""
        return self.head["out_proj"](torch.tanh(self.head["dense"](pooled)))


# The heads' checkpoint names (after the encoder prefix is stripped) -> ours: BERT's, then RoBERTa's.
_HEAD_NAMES = (
    ("pooler.dense.", "head.dense."), ("classifier.dense.", "head.dense."),
    ("classifier.out_proj.", "head.out_proj."), ("classifier.", "head.out_proj."),
)


def num_labels(hf_config: dict[str, Any]) -> int:
    """A sequence-classification config's number of labels (transformers' default: 2)."""
    return len(hf_config.get("id2label") or {}) or 2
