"""Architecture name (a Hugging Face config's `architectures`) -> model class, and which class
runs a config: a native one, or the transformers fallback (`model_impl`, as vLLM's --model-impl)."""

from __future__ import annotations

from typing import Any

from pagoda.models.bert import BertClassifierModel, BertEmbeddingModel
from pagoda.models.eagle import EAGLE_ARCHITECTURE, EagleLlamaForCausalLM
from pagoda.models.eagle3 import EAGLE3_ARCHITECTURE, EAGLE3_ARCHITECTURES, Eagle3LlamaForCausalLM
from pagoda.models.gemma import Gemma2ForCausalLM, Gemma3ForCausalLM
from pagoda.models.interface import CausalLM
from pagoda.models.llama import LlamaForCausalLM, MistralForCausalLM
from pagoda.models.llava import LlavaForConditionalGeneration, LlavaNextForConditionalGeneration
from pagoda.models.moe import MixtralForCausalLM, Qwen2MoeForCausalLM, Qwen3MoeForCausalLM
from pagoda.models.phi3 import Phi3ForCausalLM
from pagoda.models.qwen2 import Qwen2ForCausalLM
from pagoda.models.qwen2_vl import Qwen2_5_VLForConditionalGeneration, Qwen2VLForConditionalGeneration
from pagoda.models.qwen3 import Qwen3ForCausalLM
from pagoda.models.transformers_fallback import (
    TRANSFORMERS_ARCHITECTURE,
    TransformersForCausalLM,
    fallback_problem,
)

MODEL_REGISTRY: dict[str, type[CausalLM]] = {
    "BertForSequenceClassification": BertClassifierModel,
    "BertModel": BertEmbeddingModel,
    "Gemma2ForCausalLM": Gemma2ForCausalLM,
    "Gemma3ForCausalLM": Gemma3ForCausalLM,
    "LlamaForCausalLM": LlamaForCausalLM,
    "LlavaForConditionalGeneration": LlavaForConditionalGeneration,
    "LlavaNextForConditionalGeneration": LlavaNextForConditionalGeneration,
    "MistralForCausalLM": MistralForCausalLM,
    "MixtralForCausalLM": MixtralForCausalLM,
    "Phi3ForCausalLM": Phi3ForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "Qwen2VLForConditionalGeneration": Qwen2VLForConditionalGeneration,
    "Qwen2_5_VLForConditionalGeneration": Qwen2_5_VLForConditionalGeneration,
    "Qwen2MoeForCausalLM": Qwen2MoeForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
    "Qwen3MoeForCausalLM": Qwen3MoeForCausalLM,
    "RobertaForSequenceClassification": BertClassifierModel,
    "RobertaModel": BertEmbeddingModel,
    "XLMRobertaForSequenceClassification": BertClassifierModel,
    "XLMRobertaModel": BertEmbeddingModel,
}

# Configs read from GGUF files carry a model_type but no architectures.
_BY_MODEL_TYPE = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}


def model_architecture(hf_config: Any, model_impl: str = "auto") -> str:
    """The registry name of the class that runs a Hugging Face config's model. model_impl: auto
    (native when Pagoda has the architecture, else the transformers fallback), pagoda (native only)
    or transformers (the fallback, even for a native architecture)."""
    native = _native_architecture(hf_config)
    if model_impl == "pagoda" or (model_impl == "auto" and native is not None):
        if native is None:
            raise ValueError(_unsupported(hf_config, "has no native Pagoda implementation (model_impl='pagoda')"))
        return native
    if native in MODEL_REGISTRY and MODEL_REGISTRY[native].is_encoder_only:
        # transformers' causal LM for its config would be a decoder with a random head (BertLMHeadModel).
        raise ValueError(
            f"model_impl={model_impl!r} is invalid for {native}: the transformers fallback runs causal LMs only, and "
            "this is an encoder-only model; use model_impl='auto' or 'pagoda'"
        )
    problem = fallback_problem(hf_config)
    if problem is not None:
        raise ValueError(_unsupported(hf_config, f"cannot run through the transformers fallback: {problem}"))
    return TRANSFORMERS_ARCHITECTURE


def _native_architecture(hf_config: Any) -> str | None:
    architectures = getattr(hf_config, "architectures", None) or []
    if any(arch in EAGLE3_ARCHITECTURES for arch in architectures):
        return EAGLE3_ARCHITECTURE  # a speculative head (config/resolve.py refuses it as a target)
    for arch in architectures:
        if arch in MODEL_REGISTRY:
            return arch
    if not architectures:
        return _BY_MODEL_TYPE.get(getattr(hf_config, "model_type", None))
    return None


def text_architecture(text_config: dict[str, Any]) -> str:
    """The registry name of a vision-language model's language model, from its text config's values."""
    for arch in text_config.get("architectures") or ():
        if arch in MODEL_REGISTRY:
            return arch
    model_type = text_config.get("model_type", "llama")
    if model_type not in _BY_MODEL_TYPE:
        raise ValueError(f"a {model_type} language model has no native Pagoda implementation")
    return _BY_MODEL_TYPE[model_type]


def _unsupported(hf_config: Any, why: str) -> str:
    architectures = getattr(hf_config, "architectures", None) or [getattr(hf_config, "model_type", None)]
    return f"model architectures {architectures} {why}; natively supported: {sorted(MODEL_REGISTRY)}"


def model_class(architecture: str) -> type[CausalLM]:
    if architecture == TRANSFORMERS_ARCHITECTURE:
        return TransformersForCausalLM
    if architecture == EAGLE_ARCHITECTURE:  # a speculative head: built by spec/eagle.py, never as a target
        return EagleLlamaForCausalLM
    if architecture == EAGLE3_ARCHITECTURE:
        return Eagle3LlamaForCausalLM
    return MODEL_REGISTRY[architecture]
