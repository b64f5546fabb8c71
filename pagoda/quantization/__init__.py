"""Quantized weights: one QuantizationConfig per `--quantization` value (vLLM's names), each
giving the linear layers their LinearMethod."""

from __future__ import annotations

from typing import Any

from pagoda.quantization.awq import AWQConfig
from pagoda.quantization.base import QuantizationConfig
from pagoda.quantization.gptq import GPTQConfig

QUANTIZATION_METHODS: dict[str, type[QuantizationConfig]] = {
    AWQConfig.name: AWQConfig,
    GPTQConfig.name: GPTQConfig,
}


def get_quantization_config(name: str, checkpoint_config: dict[str, Any]) -> QuantizationConfig:
    """The config of method `name` (--quantization) from the checkpoint's quantization_config."""
    if name not in QUANTIZATION_METHODS:
        raise ValueError(f"--quantization {name!r} is not supported; supported: {', '.join(sorted(QUANTIZATION_METHODS))}")
    return QUANTIZATION_METHODS[name].from_config(checkpoint_config)
