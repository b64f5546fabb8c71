"""Architecture name (a Hugging Face config's `architectures`) -> model class."""

from __future__ import annotations

from typing import Any

from pagoda.models.gemma import Gemma2ForCausalLM, Gemma3ForCausalLM
from pagoda.models.interface import CausalLM
from pagoda.models.llama import LlamaForCausalLM, MistralForCausalLM
from pagoda.models.moe import MixtralForCausalLM, Qwen2MoeForCausalLM, Qwen3MoeForCausalLM
from pagoda.models.phi3 import Phi3ForCausalLM
from pagoda.models.qwen2 import Qwen2ForCausalLM
from pagoda.models.qwen3 import Qwen3ForCausalLM

MODEL_REGISTRY: dict[str, type[CausalLM]] = {
    "Gemma2ForCausalLM": Gemma2ForCausalLM,
    "Gemma3ForCausalLM": Gemma3ForCausalLM,
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": MistralForCausalLM,
    "MixtralForCausalLM": MixtralForCausalLM,
    "Phi3ForCausalLM": Phi3ForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "Qwen2MoeForCausalLM": Qwen2MoeForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
    "Qwen3MoeForCausalLM": Qwen3MoeForCausalLM,
}

# Configs read from GGUF files carry a model_type but no architectures.
_BY_MODEL_TYPE = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}


def model_architecture(hf_config: Any) -> str:
    """The registry name of the class that runs a Hugging Face config's model."""
    architectures = getattr(hf_config, "architectures", None) or []
    for arch in architectures:
        if arch in MODEL_REGISTRY:
            return arch
    if not architectures and getattr(hf_config, "model_type", None) in _BY_MODEL_TYPE:
        return _BY_MODEL_TYPE[hf_config.model_type]
    raise ValueError(
        f"model architectures {architectures} are not supported; supported: {sorted(MODEL_REGISTRY)}"
    )


def model_class(architecture: str) -> type[CausalLM]:
    return MODEL_REGISTRY[architecture]
