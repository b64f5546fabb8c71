"""Weight quantization methods by their --quantization name (vLLM's spellings), and the config a
model is built with: the checkpoint's `quantization_config` read by the method it names."""

from __future__ import annotations

from typing import Any

from pagoda.quantization.awq import AWQConfig
from pagoda.quantization.base import QuantizationConfig
from pagoda.quantization.compressed_tensors import CompressedTensorsConfig
from pagoda.quantization.fp8 import Fp8Config
from pagoda.quantization.gguf import GGUFConfig
from pagoda.quantization.gptq import GPTQConfig

QUANTIZATION_METHODS: dict[str, type[QuantizationConfig]] = {
    Fp8Config.name: Fp8Config,
    CompressedTensorsConfig.name: CompressedTensorsConfig,
    AWQConfig.name: AWQConfig,
    GPTQConfig.name: GPTQConfig,
    GGUFConfig.name: GGUFConfig,
}
# Methods that only read weights a quantizer wrote, as its quantization_config describes them (fp8
# also quantizes an unquantized model at load; a GGUF file's method comes from the file itself).
_QUANTIZED_CHECKPOINTS_ONLY = (AWQConfig.name, GPTQConfig.name, CompressedTensorsConfig.name)


def get_quantization_config(name: str, checkpoint_config: dict[str, Any] | None) -> QuantizationConfig:
    """The config of method `name` from the checkpoint's quantization_config ({} or None: quantize at load)."""
    if name not in QUANTIZATION_METHODS:
        raise ValueError(f"quantization={name!r} is not supported: use one of {sorted(QUANTIZATION_METHODS)}")
    if not checkpoint_config and name in _QUANTIZED_CHECKPOINTS_ONLY:
        raise ValueError(
            f"quantization={name!r} runs {name} checkpoints, and this model's config has no quantization_config: "
            "pass the quantized checkpoint, or omit --quantization (fp8 quantizes an unquantized model at load)"
        )
    return QUANTIZATION_METHODS[name].from_config(dict(checkpoint_config or {}))


def checkpoint_method(checkpoint_config: dict[str, Any] | None) -> str | None:
    """The method a checkpoint's quantization_config names (its quant_method)."""
    return None if not checkpoint_config else checkpoint_config.get("quant_method")


def resolve_quantization(stated: str | None, checkpoint_config: dict[str, Any] | None) -> str | None:
    """The method the model runs with: the flag, or the checkpoint's; a flag that contradicts the
    checkpoint and an unknown method are refused, naming the flag or the field."""
    declared = checkpoint_method(checkpoint_config)
    if stated is not None and declared is not None and stated != declared:
        raise ValueError(
            f"quantization={stated!r} contradicts the checkpoint, whose quantization_config.quant_method is "
            f"{declared!r}: omit --quantization or pass {declared!r}"
        )
    if stated is None and declared is not None and declared not in QUANTIZATION_METHODS:
        raise ValueError(
            f"the checkpoint's quantization_config.quant_method={declared!r} is not supported: "
            f"supported are {sorted(QUANTIZATION_METHODS)}"
        )
    method = stated or declared
    if method is not None and method not in QUANTIZATION_METHODS:
        raise ValueError(f"quantization={method!r} is not supported: use one of {sorted(QUANTIZATION_METHODS)}")
    return method
