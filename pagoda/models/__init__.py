"""Architecture name (config.architectures) -> model class."""

from __future__ import annotations

from typing import Any

from pagoda.models.interface import CausalLM
from pagoda.models.llama import LlamaForCausalLM, MistralForCausalLM
from pagoda.models.qwen2 import Qwen2ForCausalLM
from pagoda.models.qwen3 import Qwen3ForCausalLM

MODEL_REGISTRY: dict[str, type[CausalLM]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": MistralForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
}

# Configs read from GGUF files carry a model_type but no architectures.
_BY_MODEL_TYPE = {
    "llama": LlamaForCausalLM,
    "mistral": MistralForCausalLM,
    "qwen2": Qwen2ForCausalLM,
    "qwen3": Qwen3ForCausalLM,
}


def get_model_class(config: Any) -> type[CausalLM]:
    architectures = getattr(config, "architectures", None) or []
    for arch in architectures:
        if arch in MODEL_REGISTRY:
            return MODEL_REGISTRY[arch]
    if not architectures and getattr(config, "model_type", None) in _BY_MODEL_TYPE:
        return _BY_MODEL_TYPE[config.model_type]
    raise ValueError(
        f"model architectures {architectures} are not supported; supported: {sorted(MODEL_REGISTRY)}"
    )
