"""The transformers fallback (after vLLM's Transformers backend): a causal LM that Pagoda has no
native class for runs through transformers' own modeling code, with Pagoda's paged attention
registered as its attention function ("pagoda" in transformers' AttentionInterface). The engine
sees an ordinary CausalLM: continuous batching, the paged KV cache, prefix caching and chunked
prefill work as for a native model. transformers itself reads the checkpoint (`load_checkpoint`:
its renamings of older tensor names apply); dummy weights come through Pagoda's loader.

The step's tokens run as one row of transformers' batch (input_ids [1, T], position_ids [1, T]);
the registered function finds the step's KV caches and AttentionMetadata in a context variable
that `forward` sets, and its layer by the attention module that calls it. Which modules attend,
in what order, with what KV shape and window, is learnt once at construction by a one-token probe
forward, so no per-architecture table is needed. One rank only (no TP/PP: transformers' layers are
not split), and logits come from the model's output embeddings (model-specific logit scaling in a
transformers CausalLM's own forward does not apply)."""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pagoda.attention.backend import AttentionBackend, AttentionMetadata
from pagoda.attention.kv_cache_spec import FullAttentionSpec
from pagoda.config.model_spec import ModelSpec
from pagoda.models.interface import CausalLM
from pagoda.quantization.base import QuantizationConfig

# The registry name of the fallback (as vLLM names its Transformers backend's causal LM).
TRANSFORMERS_ARCHITECTURE = "TransformersForCausalLM"
# The name Pagoda's attention is registered under in transformers' attention interfaces.
ATTN_IMPLEMENTATION = "pagoda"


@dataclass
class _LayerShape:
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype
    sliding_window: int | None


@dataclass
class _Probe:
    """Collects each attention call's module and KV shape, in call order."""

    layers: dict[nn.Module, _LayerShape] = field(default_factory=dict)


@dataclass
class _Step:
    layer_index: dict[nn.Module, int]
    kv_caches: list[torch.Tensor]
    metadata: AttentionMetadata
    backend: AttentionBackend


_CURRENT: ContextVar[_Probe | _Step | None] = ContextVar("pagoda_transformers_step", default=None)


def _paged_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: query [1, Hq, T, D], key/value [1, Hkv, T, D]
    -> ([1, T, Hq, D], no weights). The mask is unused: the metadata says what each token sees."""
    current = _CURRENT.get()
    if current is None:
        raise RuntimeError("the 'pagoda' attention runs only inside a TransformersForCausalLM forward")
    sliding_window = kwargs.get("sliding_window")
    if isinstance(current, _Probe):
        if value.shape != key.shape:
            raise ValueError(f"{type(module).__name__}: keys and values of different shapes are not supported")
        current.layers[module] = _LayerShape(key.shape[1], key.shape[3], key.dtype, sliding_window)
        return torch.zeros_like(query).transpose(1, 2), None
    q, k, v = (x[0].transpose(0, 1).contiguous() for x in (query, key, value))
    scale = scaling if scaling is not None else q.shape[-1] ** -0.5
    out = current.backend.forward(
        q, k, v, current.kv_caches[current.layer_index[module]], current.metadata, scale,
        sliding_window=sliding_window, logits_soft_cap=kwargs.get("softcap"),
    )
    return out.unsqueeze(0), None


def _no_mask(*args: Any, **kwargs: Any) -> None:
    # The paged attention builds its own masking from the metadata; a [T, T] mask would be waste.
    return None


def register_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, _paged_attention)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, _no_mask)


def fallback_problem(hf_config: Any) -> str | None:
    """Why transformers cannot run this config's model through Pagoda's attention; None when it can."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    if type(hf_config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        return f"transformers has no causal LM for model_type {getattr(hf_config, 'model_type', None)!r}"
    model_cls = MODEL_FOR_CAUSAL_LM_MAPPING[type(hf_config)]
    if not getattr(model_cls, "_supports_attention_backend", False):
        return f"transformers' {model_cls.__name__} does not route its attention through the attention interface"
    return None


def _hf_config(spec: ModelSpec) -> Any:
    from transformers import AutoConfig

    return AutoConfig.for_model(**spec.hf_config)


class TransformersForCausalLM(CausalLM):
    """transformers' causal LM for the spec's config, its modules registered as this model's own
    (so that parameter names are the checkpoint's), attending through Pagoda's paged attention."""

    def __init__(
        self, config: ModelSpec, backend: AttentionBackend, max_position: int,
        quant_config: QuantizationConfig | None = None,
    ) -> None:
        super().__init__(config, backend, max_position, quant_config)
        if quant_config is not None:
            raise ValueError(
                f"quantization={quant_config.name!r}: the transformers fallback runs unquantized linear layers only "
                "(model_impl='transformers'); use a natively supported architecture"
            )
        from transformers import AutoModelForCausalLM

        register_attention()
        hf_model = AutoModelForCausalLM.from_config(
            _hf_config(config), dtype=torch.get_default_dtype(), attn_implementation=ATTN_IMPLEMENTATION
        ).eval()
        # Held outside nn.Module's registry: its children below are this model's, under the
        # checkpoint's names, and must not appear twice (as "hf_model.<name>").
        self.__dict__["hf_model"] = hf_model
        for name, child in hf_model.named_children():
            self.add_module(name, child)
        for name, param in hf_model.named_parameters(recurse=False):
            self.register_parameter(name, param)
        self.backend = backend
        self._layers = self._probe_layers()
        self._layer_index = {module: i for i, module in enumerate(self._layers)}

    @torch.no_grad()
    def _probe_layers(self) -> dict[nn.Module, _LayerShape]:
        probe = _Probe()
        token = _CURRENT.set(probe)
        try:
            ids = torch.zeros(1, 1, dtype=torch.long)
            self.hf_model.base_model(input_ids=ids, position_ids=ids, use_cache=False)
        finally:
            _CURRENT.reset(token)
        if not probe.layers:
            raise ValueError(
                f"{type(self.hf_model).__name__} never called its attention function: it cannot run through "
                "transformers' attention interface (use a natively supported architecture)"
            )
        return probe.layers

    @classmethod
    def weight_bytes(
        cls, config: ModelSpec, dtype: torch.dtype, quant_config: QuantizationConfig | None = None
    ) -> int:
        from pagoda.loader.weights import hf_meta_model

        return sum(p.numel() for p in hf_meta_model(config.hf_config).parameters()) * dtype.itemsize

    def kv_cache_spec(self, block_size: int) -> list[FullAttentionSpec]:
        return [
            FullAttentionSpec(block_size, s.num_kv_heads, s.head_dim, s.dtype, s.sliding_window)
            for s in self._layers.values()
        ]

    loads_own_checkpoint = True

    def load_checkpoint(self, model_dir: Path) -> None:
        """transformers reads the checkpoint (its renamings of older tensor names, base-model
        prefixes and tied heads included) on the CPU; its tensors are copied into this model's."""
        from transformers import AutoModelForCausalLM

        dtype = next(self.parameters()).dtype
        loaded = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype, local_files_only=True)
        self.hf_model.load_state_dict(loaded.state_dict())

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[torch.Tensor],
        metadata: AttentionMetadata,
    ) -> torch.Tensor:
        token = _CURRENT.set(_Step(self._layer_index, kv_caches, metadata, self.backend))
        try:
            out = self.hf_model.base_model(input_ids=input_ids[None], position_ids=positions[None], use_cache=False)
        finally:
            _CURRENT.reset(token)
        return out.last_hidden_state[0]

    def compute_logits(self, hidden: torch.Tensor, argmax_only: bool = False) -> torch.Tensor:
        return self.hf_model.get_output_embeddings()(hidden)
